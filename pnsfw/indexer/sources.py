"""SOURCE arguments -> a stream of items (never materialised), and reading an item's bytes.

A SOURCE is a folder (walked recursively, sorted), a text list of paths or URLs, a webdataset .tar (members
grouped by key: `.txt` -> caption, `.json` -> json (+ its url/caption), `.cls` -> cls), a Parquet or CSV
file with a uri column (its other columns kept as metadata), or one image file. Enumeration is
deterministic, so a resumed run sees the same order. An entry that cannot be an item (a name that is not
UTF-8, a malformed URL) becomes an item with a `problem`: an error row, never an abort.
"""

import json
import os
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import BadInput, SourceError
from ..store.shards import TAR_SEPARATOR
from .fetch import read_url
from .walk import walk_files

URI_COLUMNS = ("uri", "url", "image_path")  # recognised without --uri-column, in this order
RESERVED = ("id", "uri", "source", "sha256", "width", "height", "embedding", "uri_hash")
Meta = tuple[tuple[str, "str | None"], ...]


class Item(NamedTuple):
    uri: str
    source: str
    offset: int = -1  # tar members: where the bytes are inside the tar
    size: int = -1
    meta: Meta = ()  # metadata columns carried from the source (caption, key, json, extra columns)
    problem: tuple[str, str] | None = None  # (reason, detail): this entry becomes an error row


# ------------------------------------------------------------------ entries ---

def _printable(text: str) -> str:
    """A str that encodes as UTF-8 (undecodable bytes of a file name shown as \\xNN)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if not _is_utf8(text) else text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def url_problem(url: str) -> tuple[str, str] | None:
    """Why an http(s) URL cannot be fetched as written, or None."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "bad_url", "contains whitespace or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        return "bad_url", str(exc)
    if not parts.hostname:
        return "bad_url", "no host"
    return None


def _file_url_problem(url: str) -> tuple[str, str] | None:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return "bad_url", f"file URL of another host ({parts.netloc})"
    return None


def is_url(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def entry(text: str, source: str, base: Path | None, meta: Meta = (), **extra: Any) -> Item:
    """One listed entry as an Item; relative paths are resolved against `base`; file:// URIs kept as given."""
    if not _is_utf8(text):
        named = text if base is None or "://" in text or os.path.isabs(text) else os.path.join(base, text)
        return Item(_printable(named), source, meta=meta, problem=("bad_name", "not valid UTF-8"))
    if is_url(text):
        return Item(text, source, meta=meta, problem=url_problem(text), **extra)
    if text.startswith("file://"):
        return Item(text, source, meta=meta, problem=_file_url_problem(text), **extra)
    scheme, separator, _ = text.partition("://")
    if separator and scheme.isalpha() and len(scheme) > 1:
        return Item(text, source, meta=meta, problem=("unsupported_scheme", f"{scheme}:// is not supported"))
    if "\x00" in text:
        return Item(text.replace("\x00", "\\x00"), source, meta=meta, problem=("bad_name", "contains a NUL byte"))
    path = text if base is None or os.path.isabs(text) else str((base / text).resolve())
    return Item(path, source, meta=meta, **extra)


# ------------------------------------------------------------------ folders ---

def _walk_folder(root: Path) -> Iterator[Item]:
    source = str(root)
    for path in walk_files(source):
        # a walked path has no scheme, URL or NUL (entry() checks those): only its encoding can be wrong
        yield Item(path, source) if _is_utf8(path) else entry(path, source, None)


# ----------------------------------------------------------------- webdataset ---

SIDECARS = {".txt": "caption", ".json": "json", ".cls": "cls"}


def _key(name: str) -> tuple[str, str]:
    """webdataset's split: folder/base up to the first dot of the base is the key, the rest the extension."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), (dot + ext).lower()


def _sidecar_meta(key: str, sidecars: dict[str, str]) -> Meta:
    meta: dict[str, str | None] = {"key": key}
    if "json" in sidecars:
        meta["json"] = sidecars["json"]
        try:
            record = json.loads(sidecars["json"])
        except ValueError:
            record = None
        if isinstance(record, dict):
            for name in ("url", "caption"):
                if isinstance(record.get(name), str):
                    meta[name] = record[name]
    for name in ("caption", "cls"):
        if name in sidecars:
            meta[name] = sidecars[name].strip() if name == "cls" else sidecars[name]
    return tuple(meta.items())


def _group_items(path: Path, key: str, members: list[tarfile.TarInfo], sidecars: dict[str, str]) -> Iterator[Item]:
    meta = _sidecar_meta(key, sidecars)
    for member in members:
        yield entry(f"{path}{TAR_SEPARATOR}{member.name}", str(path), None, meta,
                    offset=member.offset_data, size=member.size)


def _tar_members(path: Path) -> Iterator[Item]:
    """Members grouped by key (consecutive, as webdataset groups them); sidecars are metadata, not items."""
    try:
        with tarfile.open(path) as tar:
            key: str | None = None
            members: list[tarfile.TarInfo] = []
            sidecars: dict[str, str] = {}
            for member in tar:
                if not member.isfile() or os.path.basename(member.name).startswith("."):
                    continue
                member_key, ext = _key(member.name)
                if member_key != key:
                    yield from _group_items(path, key or "", members, sidecars)
                    key, members, sidecars = member_key, [], {}
                if ext in SIDECARS:
                    data = tar.extractfile(member)
                    sidecars[SIDECARS[ext]] = data.read().decode("utf-8", "replace") if data else ""
                else:
                    members.append(member)
            yield from _group_items(path, key or "", members, sidecars)
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"cannot read tar {path}: {exc}") from None


# -------------------------------------------------------------------- lists ---

def _text_lines(path: Path) -> Iterator[Item]:
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = os.fsdecode(raw.rstrip(b"\r\n")).strip()  # bytes that are not UTF-8: a bad_name row
                if line and not line.startswith("#"):
                    yield entry(line, str(path), path.parent)
    except OSError as exc:
        raise SourceError(f"cannot read list {path}: {exc}") from None


# ------------------------------------------------------------ table sources ---

def _open_table(path: Path) -> tuple[Any, Callable[[], Iterator[Any]]]:
    """(schema, a function returning record batches) of a Parquet or CSV file, without reading its rows."""
    import pyarrow as pa

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        return parquet.schema_arrow, lambda: parquet.iter_batches(batch_size=4096)
    import pyarrow.csv as csv

    inferred = csv.open_csv(path).schema  # types guessed from the first block, for the uri column's check
    names = inferred.names
    strings = csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
    return inferred, lambda: iter(csv.open_csv(path, convert_options=strings))


def uri_column(path: "Path | str", schema: Any, wanted: str | None) -> str:
    """The uri column of a table source: --uri-column, or the first of URI_COLUMNS present; it must be text."""
    import pyarrow as pa

    name = wanted or next((n for n in URI_COLUMNS if n in schema.names), None)
    if name is None or name not in schema.names:
        looked = repr(wanted) if wanted else " or ".join(repr(n) for n in URI_COLUMNS)
        raise SourceError(f"{path} has no column {looked} (its columns: {', '.join(schema.names)}); "
                          f"pick one with --uri-column NAME")
    kind = schema.field(name).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"column {name!r} of {path} holds {kind}, not text paths or URLs; "
                          f"pick another column with --uri-column NAME")
    return name


def _text_column(column: Any) -> list[str | None]:
    """Any Arrow column as strings (nested values as JSON), for a metadata column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    try:
        return pc.cast(column, pa.string()).to_pylist()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]


def meta_name(name: str) -> str:
    """A source column's name in the store (a name the store uses itself gets a `source_` prefix)."""
    return f"source_{name}" if name in RESERVED else name


def _table_items(path: Path, wanted: str | None) -> Iterator[Item]:
    try:
        schema, batches = _open_table(path)
        name = uri_column(path, schema, wanted)
        for batch in batches():
            uris = batch.column(name).to_pylist()
            extra = [(meta_name(n), _text_column(batch.column(n))) for n in batch.schema.names if n != name]
            for row, uri in enumerate(uris):
                if uri:
                    yield entry(uri, str(path), path.parent, tuple((n, values[row]) for n, values in extra))
    except SourceError:
        raise
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise SourceError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------ sources ---

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
TABLES = (".parquet", ".csv")
SOURCE_KINDS: dict[str, Callable[[Path, "str | None"], Iterator[Item]]] = {
    ".tar": lambda p, _: _tar_members(p), ".parquet": _table_items, ".csv": _table_items,
    ".txt": lambda p, _: _text_lines(p), ".lst": lambda p, _: _text_lines(p),
}


def _source_path(source: str) -> Path:
    path = Path(source).expanduser().resolve()
    if not path.is_dir() and not path.is_file():
        raise SourceError(f"source {source} does not exist")
    if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES | set(SOURCE_KINDS):
        raise SourceError(f"source {source}: not a folder, .tar, .parquet, .csv, .txt list or image file")
    return path


def check_sources(sources: list[str], column: str | None = None) -> None:
    """Fail with one line, before any work, on a missing source or a table without a usable uri column."""
    for source in sources:
        path = _source_path(source)
        if path.is_file() and path.suffix.lower() in TABLES:
            try:
                schema, _ = _open_table(path)
            except Exception as exc:
                raise SourceError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
            uri_column(path, schema, column)


def iter_items(source: str, column: str | None = None) -> Iterator[Item]:
    """All items of one SOURCE, in a stable order, as a stream."""
    path = _source_path(source)
    if path.is_dir():
        return _walk_folder(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return iter([Item(str(path), str(path.parent))])
    return SOURCE_KINDS[suffix](path, column)


# ------------------------------------------------------------------ reading ---

def _read_tar(item: Item) -> bytes:
    with open(item.uri.split(TAR_SEPARATOR, 1)[0], "rb") as f:
        f.seek(item.offset)
        return f.read(item.size)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def local_path(uri: str) -> str:
    """The file a plain path or file:// URI names."""
    if uri.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlsplit(uri).path)
    return uri


def read_bytes(item: Item, timeout: float = 10.0, max_bytes: int = 20_000_000) -> bytes:
    """The encoded bytes of an item (raises OSError / URLError / fetch.TooLarge on failure).

    `timeout` and `max_bytes` bound a URL's whole fetch (local files are not capped)."""
    if item.offset >= 0:
        return _read_tar(item)
    if is_url(item.uri):
        return read_url(item.uri, timeout, max_bytes)
    return _read_file(local_path(item.uri))


def stage_of(item: Item) -> str:
    if item.problem is not None:
        return "list"
    return "fetch" if is_url(item.uri) else "read"


def list_files(inputs: list[str]) -> list[str]:
    """Files as given; folders walked recursively (hidden files skipped), in a stable order."""
    paths = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            paths += [item.uri for item in iter_items(str(path))]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise BadInput(f"{entry}: no such file or folder")
    if not paths:
        raise BadInput(f"no files found in {', '.join(inputs)}")
    return paths
