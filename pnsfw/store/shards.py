"""Shard and error-file schemas, writing and reading.

The embedding column is `fixed_size_binary(dim * 2)`: raw little-endian fp16,
uncompressed, no dictionary, 64k-row groups. scripts/bench_shard_read.py
measured it ~18x faster to read than `fixed_size_list<float16>`; the dtype and
dim are in the field metadata so readers without pnsfw can decode it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_write
from .urihash import blake2b_64

ROW_GROUP = 1 << 16
TAR_SEPARATOR = "::"  # the stored uri of a tar member: /abs/path/data.tar::folder/name.jpg
ERROR_SCHEMA = pa.schema([("uri", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                          ("reason", pa.string()), ("detail", pa.string())])
# by: who gave the label (may be null); classes: the comma-joined set it was chosen from (null: undeclared);
# parts written before these two columns existed read them as nulls
LABEL_SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.string()), ("source", pa.string()),
                          ("at", pa.float64()), ("by", pa.string()), ("classes", pa.string())])
FIXED_COLUMNS = ("id", "uri", "source", "sha256", "width", "height", "uri_hash", "embedding")
ITEM_COLUMNS = ["id", "uri", "source", "sha256", "width", "height"]  # what `table()` reads by default


def shard_schema(dim: int, extra: tuple[str, ...] = ()) -> pa.Schema:
    """The fixed columns, then metadata columns carried from the source (strings)."""
    meta = {b"dtype": b"float16", b"dim": str(dim).encode(), b"byteorder": b"little"}
    return pa.schema([
        ("id", pa.int64()), ("uri", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("uri_hash", pa.uint64()),
        pa.field("embedding", pa.binary(dim * 2), metadata=meta),
        *[(name, pa.string()) for name in extra],
    ])


HASH_BATCH = 4096  # uris of a list hashed per call: the GIL is held within one (~1.5 ms), other threads run between
LANES_CORES = 4  # uri_hash(column) default: the numpy lanes on machines of this many cores or more
_OFFSETS = {pa.string(): np.int32, pa.binary(): np.int32, pa.large_string(): np.int64, pa.large_binary(): np.int64}


def uri_hash(uris: list[str] | pa.Array | pa.ChunkedArray, lanes: bool | None = None) -> np.ndarray:
    """uint64 per uri: the first 8 bytes (little-endian) of blake2b of its UTF-8, as hashlib computes it (stable
    across runs, machines and Python versions).

    An Arrow column is hashed from its buffers by urihash.blake2b_64 (numpy over uint64 lanes: no Python object
    a uri, the GIL released inside each numpy call, so threads hash in parallel; ~2-5x hashlib's CPU time, so
    `lanes` None means: when the machine has LANES_CORES cores or more). A list (store look-ups, error uris:
    few), or a column with lanes False, goes through hashlib one uri at a time, in batches of HASH_BATCH so that
    a thread waiting for the GIL gets it between batches. Both give the same values (tests/test_import.py)."""
    if isinstance(uris, (pa.Array, pa.ChunkedArray)):
        if uris.null_count:
            raise ValueError("uri_hash of a null uri")
        column = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
        if not len(column):
            return np.zeros(0, "<u8")
        if not (lanes if lanes is not None else (os.cpu_count() or 1) >= LANES_CORES):
            return _hashlib_batches(column.cast(pa.large_binary()).to_pylist())
        if column.type not in _OFFSETS:
            column = column.cast(pa.large_string())
        _, offsets, values = column.buffers()
        width = _OFFSETS[column.type]
        bounds = np.frombuffer(offsets, width)[column.offset:column.offset + len(column) + 1]
        data = np.frombuffer(values, np.uint8) if values is not None else np.zeros(0, np.uint8)
        return blake2b_64(data, bounds)
    return _hashlib_batches([u.encode("utf-8", "surrogateescape") for u in uris])


def _hashlib_batches(encoded: list[bytes]) -> np.ndarray:
    digest = functools.partial(hashlib.blake2b, digest_size=8)
    batches = (encoded[i:i + HASH_BATCH] for i in range(0, len(encoded), HASH_BATCH))
    joined = b"".join([b"".join(map(hashlib.blake2b.digest, map(digest, batch))) for batch in batches])
    hashed: np.ndarray = np.frombuffer(joined, "<u8").copy()
    return hashed


def uri_hash_one(uri: str) -> int:
    """uri_hash of one uri, as a Python int (what `index` checks each new item with)."""
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def normalize_rows(table: pa.Table, dim: int) -> pa.Table:
    """A rows table in the shard schema: uri_hash computed from the uri (kept when the table has it already: the
    importer hashes chunk by chunk as it maps them), extra columns as strings."""
    columns: dict[str, Any] = {}
    for name in ("id", "uri", "source", "sha256", "width", "height"):
        columns[name] = table.column(name)
    given = table.column("uri_hash") if "uri_hash" in table.column_names else None
    keep = given is not None and given.type == pa.uint64() and not given.null_count
    columns["uri_hash"] = given if keep else number_array(uri_hash(table.column("uri")), pa.uint64())
    columns["embedding"] = table.column("embedding")
    extra = tuple(n for n in table.column_names if n not in FIXED_COLUMNS)
    for name in extra:
        column = table.column(name)
        columns[name] = column if pa.types.is_string(column.type) else column.cast(pa.string())
    schema = shard_schema(dim, extra)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def string_array(values: Iterable[str | None]) -> pa.Array:
    """Python strings (None: null) -> a string column, built from one joined buffer rather than by `pa.array`:
    the first `pa.array` of a process imports pandas, whatever its input (1.2-1.5 s without bytecode on 2 cores;
    2.26 s on the GPU path's writer thread, holding the GIL beside the first batches: docs/benchmarks.md, GPU
    round 15). `scripts/bench_arrow_columns.py` compares the two."""
    text = values if isinstance(values, list) else list(values)
    if None in text:
        builder = pa.lib.StringBuilder()  # nulls: one value at a time (metadata columns, where rows lack one)
        builder.append_values(text)
        return builder.finish()
    strings = cast(list[str], text)
    data = "".join(strings).encode("utf-8")
    lengths = np.fromiter(map(len, strings), np.int64, len(strings))
    if len(data) != lengths.sum():  # not all ASCII: a character is not a byte
        lengths = np.fromiter((len(value.encode("utf-8")) for value in strings), np.int64, len(strings))
    if len(data) >= 1 << 31:
        raise ValueError("string_array: more than 2 GiB of text for one column")
    offsets = np.zeros(len(strings) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.StringArray.from_buffers(len(strings), pa.py_buffer(offsets), pa.py_buffer(data))


# numpy's dtype of each fixed-width number type: DataType.to_pandas_dtype imports pandas in some pyarrow builds
# (the device image's: 0.68 s on the GPU writer thread beside the first batches, an H100, round 15)
NUMPY_DTYPES = {pa.int8(): "i1", pa.int16(): "<i2", pa.int32(): "<i4", pa.int64(): "<i8", pa.uint8(): "u1",
                pa.uint16(): "<u2", pa.uint32(): "<u4", pa.uint64(): "<u8", pa.float16(): "<f2",
                pa.float32(): "<f4", pa.float64(): "<f8"}


def numpy_dtype(kind: pa.DataType) -> np.dtype:
    """numpy's dtype for the fixed-width number type `kind` (TypeError for any other type)."""
    try:
        return np.dtype(NUMPY_DTYPES[kind])
    except KeyError:
        raise TypeError(f"not a fixed-width number type: {kind}") from None


def number_array(values: Iterable[int | float] | np.ndarray, kind: pa.DataType) -> pa.Array:
    """Numbers -> a column of `kind` (an integer or float type, no nulls), without `pa.array` (see string_array)."""
    flat = np.ascontiguousarray(values if isinstance(values, np.ndarray) else list(values), dtype=numpy_dtype(kind))
    return pa.Array.from_buffers(kind, len(flat), [None, pa.py_buffer(flat)])


def column_array(values: Iterable[Any], kind: pa.DataType) -> pa.Array:
    """`pa.array(values, kind)` for string and fixed-width number columns, without importing pandas."""
    return string_array(values) if pa.types.is_string(kind) else number_array(values, kind)


def embedding_array(emb: np.ndarray) -> pa.Array:
    """fp16 (n, dim) matrix -> fixed_size_binary column without copying row by row."""
    emb = np.ascontiguousarray(emb, dtype="<f2")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(emb.shape[1] * 2), len(emb),
                                                [None, pa.py_buffer(emb.reshape(-1).view(np.uint8))])


def _values(column: pa.ChunkedArray | pa.Array, dtype: str | np.dtype, width: int = 1) -> np.ndarray:
    """A fixed-width column's values buffer, `width` numbers a row (zero-copy for one chunk; nulls not masked)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype)[c.offset * width:(c.offset + len(c)) * width] for c in chunks]
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """fixed_size_binary column -> fp16 (n, dim) matrix (zero-copy for one chunk)."""
    return _values(column, "<f2", dim).reshape(-1, dim)


def number_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An integer or float column without nulls -> numpy, without `to_numpy` (it imports pandas: string_array)."""
    if column.null_count:
        raise ValueError("number_values: the column has nulls")
    return _values(column, numpy_dtype(column.type))


UNIQUE_COLUMNS = ("id", "uri", "uri_hash", "sha256", "embedding")  # a dictionary of these only costs time


def write_table(table: pa.Table, path: Path) -> None:
    """Write a table to path (not atomic: callers write a temporary name); embedding raw, the rest zstd; no
    dictionary for columns of unique values, no min/max statistics of the embedding column (nothing reads
    them; they cost ~0.1 us a 512-d row)."""
    names = table.column_names
    compression = {name: ("none" if name == "embedding" else "zstd") for name in names}
    pq.write_table(table, path, compression=compression, row_group_size=ROW_GROUP,
                   use_dictionary=[name for name in names if name not in UNIQUE_COLUMNS],
                   write_statistics=[name for name in names if name != "embedding"])


def write_parquet(table: pa.Table, path: Path) -> None:
    """Atomically write a table; the embedding column raw, the rest zstd."""
    atomic_write(path, lambda tmp: write_table(table, tmp))


def parquet_file(source: Any) -> pq.ParquetFile:
    """A local path (memory-mapped) or a file object."""
    return pq.ParquetFile(source, memory_map=isinstance(source, (str, Path)))


def iter_batches(source: Any, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a shard one row group at a time, memory-mapped."""
    yield from parquet_file(source).iter_batches(batch_size=ROW_GROUP, columns=columns)


def read_table(source: Any, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file whole (`pq.read_table` would import pyarrow.dataset, and pandas with it: string_array)."""
    return parquet_file(source).read(columns=columns)
