"""SOURCE arguments -> an ordered list of items, and reading an item's bytes.

A SOURCE is a folder (walked recursively, sorted), a text file of paths or
http(s) URLs, a webdataset .tar, a Parquet file with a `uri` column, or one
image file. Enumeration is deterministic, so a resumed run sees the same order.
"""

import os
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import SourceError

TAR_SEPARATOR = "::"  # uri of a tar member: /abs/path/data.tar::folder/name.jpg
USER_AGENT = "pnsfw/0.1 (+https://github.com/pnsfw)"


class Item(NamedTuple):
    uri: str
    source: str
    offset: int = -1  # tar members: where the bytes are inside the tar
    size: int = -1


def _walk_folder(root: Path) -> Iterator[Item]:
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Item(os.path.join(folder, name), str(root))


def _tar_members(path: Path) -> Iterator[Item]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and not os.path.basename(member.name).startswith("."):
                    yield Item(f"{path}{TAR_SEPARATOR}{member.name}", str(path), member.offset_data, member.size)
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"cannot read tar {path}: {exc}") from None


def _resolve(entry: str, base: Path) -> str:
    if entry.startswith(("http://", "https://")):
        return entry
    return str((base / entry).resolve()) if not os.path.isabs(entry) else entry


def _text_lines(path: Path) -> Iterator[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read list {path}: {exc}") from None
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield Item(_resolve(line, path.parent), str(path))


def _parquet_uris(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["uri"]).column("uri")
    except Exception as exc:  # pyarrow raises several types for a missing column or a bad file
        raise SourceError(f"cannot read a `uri` column from {path}: {exc}") from None
    for uri in column.to_pylist():
        if uri:
            yield Item(_resolve(uri, path.parent), str(path))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
SOURCE_KINDS: dict[str, Callable[[Path], Iterator[Item]]] = {
    ".tar": _tar_members, ".parquet": _parquet_uris, ".txt": _text_lines, ".csv": _text_lines, ".lst": _text_lines,
}


def iter_items(source: str) -> Iterator[Item]:
    """All items of one SOURCE, in a stable order."""
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return _walk_folder(path)
    if not path.is_file():
        raise SourceError(f"source {source} does not exist")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return iter([Item(str(path), str(path.parent))])
    if suffix not in SOURCE_KINDS:
        raise SourceError(f"source {source}: not a folder, .tar, .parquet, .txt list or image file")
    return SOURCE_KINDS[suffix](path)


def _read_tar(item: Item, timeout: float) -> bytes:
    with open(item.uri.split(TAR_SEPARATOR, 1)[0], "rb") as f:
        f.seek(item.offset)
        return f.read(item.size)


def _read_url(item: Item, timeout: float) -> bytes:
    request = urllib.request.Request(item.uri, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _read_file(item: Item, timeout: float) -> bytes:
    with open(item.uri, "rb") as f:
        return f.read()


def read_bytes(item: Item, timeout: float = 10.0) -> bytes:
    """The encoded bytes of an item (raises OSError / URLError on failure)."""
    if item.offset >= 0:
        return _read_tar(item, timeout)
    if item.uri.startswith(("http://", "https://")):
        return _read_url(item, timeout)
    return _read_file(item, timeout)


def stage_of(item: Item) -> str:
    return "fetch" if item.uri.startswith(("http://", "https://")) else "read"
