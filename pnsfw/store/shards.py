"""Shard and error-file schemas, writing and reading.

The embedding column is `fixed_size_binary(dim * 2)`: raw little-endian fp16,
uncompressed, no dictionary, 64k-row groups. scripts/bench_shard_read.py
measured it ~18x faster to read than `fixed_size_list<float16>`; the dtype and
dim are in the field metadata so readers without pnsfw can decode it.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_write

ROW_GROUP = 1 << 16
ERROR_SCHEMA = pa.schema([("uri", pa.string()), ("source", pa.string()), ("stage", pa.string()),
                          ("reason", pa.string()), ("detail", pa.string())])


def shard_schema(dim: int) -> pa.Schema:
    meta = {b"dtype": b"float16", b"dim": str(dim).encode(), b"byteorder": b"little"}
    return pa.schema([
        ("id", pa.int64()), ("uri", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()),
        pa.field("embedding", pa.binary(dim * 2), metadata=meta),
    ])


def embedding_array(emb: np.ndarray) -> pa.Array:
    """fp16 (n, dim) matrix -> fixed_size_binary column without copying row by row."""
    emb = np.ascontiguousarray(emb, dtype="<f2")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(emb.shape[1] * 2), len(emb),
                                                [None, pa.py_buffer(emb.tobytes())])


def embedding_matrix(column: "pa.ChunkedArray | pa.Array", dim: int) -> np.ndarray:
    """fixed_size_binary column -> fp16 (n, dim) matrix (zero-copy for one chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.frombuffer(c.buffers()[1], dtype="<f2")[c.offset * dim:(c.offset + len(c)) * dim] for c in chunks]
    if not parts:
        return np.zeros((0, dim), dtype=np.float16)
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.reshape(-1, dim)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Atomically write a table; the embedding column raw, the rest zstd."""
    dictionary = [name for name in table.column_names if name != "embedding"]
    compression = {name: ("none" if name == "embedding" else "zstd") for name in table.column_names}
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=compression,
                                                  use_dictionary=dictionary, row_group_size=ROW_GROUP))


def iter_batches(path: Path, columns: "list[str] | None" = None) -> Iterator[pa.RecordBatch]:
    """Stream a shard one row group at a time, memory-mapped."""
    yield from pq.ParquetFile(path, memory_map=True).iter_batches(batch_size=ROW_GROUP, columns=columns)


def read_table(path: Path, columns: "list[str] | None" = None) -> pa.Table:
    return pq.read_table(path, columns=columns, memory_map=True)
