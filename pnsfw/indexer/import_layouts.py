"""Readers of embeddings other tools wrote: the clip-retrieval layout and plain Parquet (as embedding-reader reads).

A layout turns PATHs into units (one embedding file each, in a stable order); a unit streams chunks of at most
`chunk` rows from a row offset (so a resumed import starts where the store's commits end) in bounded memory:
.npy files are read a chunk at a time (readinto), Parquet files one record batch at a time. PATHs are local
paths or fsspec URLs (place.py); remote files are streamed the same way.
"""

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SourceError
from .place import Place
from .sources import uri_column
from .unitvec import pooled_empty

log = logging.getLogger("pnsfw.indexer")
EMBEDDING_COLUMNS = ("embedding", "emb", "img_emb", "image_embedding")
RAW_WIDTHS = (512, 640, 768, 1024, 1280)  # CLIP widths: a fixed-size binary of 4x one of them is float32


@dataclass
class Chunk:
    """Rows [start, start + n) of a unit: embeddings (n, width) (an object array of rows when ragged) + metadata."""

    start: int
    embeddings: np.ndarray
    metadata: pa.Table


@dataclass
class Unit:
    source: str  # recorded in each row's `source` column: how a resumed import finds its offset
    rows: int
    uri_column: str
    read: Callable[[int, int], Iterator[Chunk]]  # (start, chunk) -> chunks


def _metadata_batches(file: pq.ParquetFile, start: int, chunk: int) -> Iterator[pa.Table]:
    """Metadata rows from `start` on, in tables of at most `chunk` rows (row groups before start are skipped)."""
    first, skip = 0, start
    while first < file.num_row_groups and skip >= file.metadata.row_group(first).num_rows:
        skip -= file.metadata.row_group(first).num_rows
        first += 1
    groups = list(range(first, file.num_row_groups))
    if not groups:
        return
    for batch in file.iter_batches(batch_size=chunk, row_groups=groups):
        table = pa.Table.from_batches([batch])
        if skip:
            table, skip = table.slice(min(skip, table.num_rows)), max(0, skip - table.num_rows)
        if table.num_rows:
            yield table


# ---- clip-retrieval: img_emb/img_emb_N.npy + metadata/metadata_N.parquet
def _numbered(folder: Place, prefix: str, suffix: str) -> dict[int, Place]:
    pattern = re.compile(rf"{prefix}_(\d+){re.escape(suffix)}$")
    found = {}
    for place in folder.children():
        match = pattern.match(place.name)
        if match:
            found[int(match.group(1))] = place
    return found


@dataclass
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # of the first row in the file


def _npy_header(path: Place) -> NpyHeader:
    """Shape, dtype and data offset of an .npy file, checked: 2-d, float, C order."""
    try:
        with path.open() as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if len(shape) != 2 or dtype.kind != "f" or dtype.hasobject or (fortran and shape[1] > 1):
        raise SourceError(f"{path}: expected a 2-d C-order float16/float32 array, got {dtype} {shape}")
    return NpyHeader(shape, dtype, offset)


def _read_rows(file: Any, header: NpyHeader, count: int) -> np.ndarray:
    """The next COUNT rows, read into an array of Arrow's pool (one read call: page-cache copies beat memory-map
    faults; the pool's pages are reused, a fresh numpy array's are faulted in again)."""
    rows = pooled_empty((count, header.shape[1]), header.dtype)
    view = memoryview(rows.reshape(-1).view(np.uint8).data)
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])
        if not got:
            raise SourceError(f"{getattr(file, 'name', 'an .npy file')}: truncated (expected {header.shape[0]:,} rows)")
        done += got
    return rows


def _npy_unit(emb_path: Place, meta_path: Place, wanted_uri: "str | None") -> Unit:
    header = _npy_header(emb_path)
    rows = header.shape[0]
    meta = meta_path.parquet()
    meta_rows, uris = meta.metadata.num_rows, uri_column(str(meta_path), meta.schema_arrow, wanted_uri)
    if meta_rows != rows:
        raise SourceError(f"{emb_path} has {rows:,} embeddings but {meta_path} has {meta_rows:,} rows")

    def read(start: int, chunk: int) -> Iterator[Chunk]:
        with emb_path.open() as file:
            file.seek(header.offset + start * header.shape[1] * header.dtype.itemsize)
            offset = start
            for table in _metadata_batches(meta_path.parquet(), start, chunk):
                yield Chunk(offset, _read_rows(file, header, table.num_rows), table)
                offset += table.num_rows

    return Unit(str(emb_path), rows, uris, read)


def clip_retrieval_units(root: Place, _embedding_column: "str | None", wanted_uri: "str | None") -> list[Unit]:
    embeddings = _numbered(root.child("img_emb"), "img_emb", ".npy")
    metadata = _numbered(root.child("metadata"), "metadata", ".parquet")
    if not embeddings:
        raise SourceError(f"{root}: no img_emb/img_emb_N.npy files (clip-retrieval layout)")
    missing = sorted(set(embeddings) - set(metadata))
    if missing:
        raise SourceError(f"{root}: img_emb_{missing[0]}.npy has no metadata/metadata_{missing[0]}.parquet")
    if root.child("text_emb").is_dir():
        log.warning("%s: text_emb/ ignored (only image embeddings are imported)", root)
    return [_npy_unit(embeddings[n], metadata[n], wanted_uri) for n in sorted(embeddings)]


# ---- parquet: an embedding column (list<float> or fixed-size binary) + a uri column
def _binary_dtype(field: pa.Field) -> np.dtype:
    declared = (field.metadata or {}).get(b"dtype")
    if declared:
        return np.dtype(declared.decode())
    width = field.type.byte_width
    return np.dtype("<f4") if width % 4 == 0 and width // 4 in RAW_WIDTHS else np.dtype("<f2")


def embeddings_of(column: "pa.Array | pa.ChunkedArray", field: pa.Field) -> np.ndarray:
    """An embedding column -> (n, width) floats, or an object array of rows when their lengths differ."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_binary(field.type):
        dtype = _binary_dtype(field)
        flat = np.frombuffer(column.buffers()[1], dtype=dtype)
        width = field.type.byte_width // dtype.itemsize
        return flat[column.offset * width:(column.offset + len(column)) * width].reshape(-1, width)
    if not (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
            or pa.types.is_fixed_size_list(field.type)):
        raise SourceError(f"embedding column {field.name!r} is {field.type}: expected list<float> or fixed-size binary")
    column = column.fill_null([])
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    values = column.flatten().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths == lengths[0]).all():
        return values.reshape(len(lengths), int(lengths[0]))
    rows = np.empty(len(lengths), dtype=object)
    rows[:] = np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return rows


def _pick(names: list[str], given: "str | None", choices: tuple[str, ...], what: str, path: Place) -> str:
    if given:
        if given not in names:
            raise SourceError(f"{path}: no column {given!r} (columns: {', '.join(names)})")
        return given
    for name in choices:
        if name in names:
            return name
    raise SourceError(f"{path}: no {what} column among {', '.join(choices)}; name it with --{what}-column")


def _parquet_unit(path: Place, embedding_column: "str | None", wanted_uri: "str | None") -> Unit:
    file = path.parquet()
    schema = file.schema_arrow
    column = _pick(schema.names, embedding_column, EMBEDDING_COLUMNS, "embedding", path)
    field = schema.field(column)
    uris = uri_column(str(path), schema.remove(schema.get_field_index(column)), wanted_uri)

    def read(start: int, chunk: int) -> Iterator[Chunk]:
        offset = start
        for table in _metadata_batches(path.parquet(), start, chunk):
            yield Chunk(offset, embeddings_of(table.column(column), field), table.drop_columns([column]))
            offset += table.num_rows

    return Unit(str(path), file.metadata.num_rows, uris, read)


def parquet_units(root: Place, embedding_column: "str | None", wanted_uri: "str | None") -> list[Unit]:
    files = root.files(".parquet") if root.is_dir() else [root]
    if not files:
        raise SourceError(f"{root}: no .parquet files")
    return [_parquet_unit(f, embedding_column, wanted_uri) for f in files]


def detect_layout(path: Place) -> str:
    if path.child("img_emb").is_dir():
        return "clip-retrieval"
    if path.path.endswith(".parquet") or path.is_dir():
        return "parquet"
    raise SourceError(f"{path}: not a clip-retrieval folder (img_emb/ + metadata/), a .parquet file or a folder "
                      "of them")


LAYOUTS: dict[str, Callable[[Place, "str | None", "str | None"], list[Unit]]] = {
    "clip-retrieval": clip_retrieval_units,
    "parquet": parquet_units,
}


def open_units(paths: list[str], layout: str, embedding_column: "str | None", wanted_uri: "str | None") -> list[Unit]:
    """Every unit of every PATH (a local path or an fsspec URL), in order."""
    units = []
    for given in paths:
        path = Place.of(given)
        if not path.exists():
            raise SourceError(f"{given}: no such file or folder")
        kind = detect_layout(path) if layout == "auto" else layout
        if kind not in LAYOUTS:
            raise SourceError(f"--layout {layout!r}: use auto, {', '.join(LAYOUTS)}")
        units += LAYOUTS[kind](path, embedding_column, wanted_uri)
    return units
