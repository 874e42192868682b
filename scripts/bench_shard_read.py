"""Measure Parquet read speed of candidate embedding-column layouts.

Usage: python scripts/bench_shard_read.py [--rows 1000000] [--dim 256] [--out bench_shard_read.json]

Prints GB/s (embedding bytes turned into numpy fp16 matrices, one per row group,
per second, one process, file in the page cache) for each layout and compression, and writes JSON.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _binary_column(emb: np.ndarray) -> pa.Array:
    width = emb.shape[1] * emb.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(emb), [None, pa.py_buffer(emb.tobytes())])


def _list_column(emb: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), type=pa.float16()), emb.shape[1])


def _read_binary(col: pa.ChunkedArray, dim: int) -> list[np.ndarray]:
    """Zero-copy fp16 views, one per row group (what a streaming reader consumes)."""
    return [np.frombuffer(c.buffers()[1], dtype=np.float16)[c.offset * dim:(c.offset + len(c)) * dim].reshape(-1, dim)
            for c in col.chunks]


def _read_list(col: pa.ChunkedArray, dim: int) -> list[np.ndarray]:
    return [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for c in col.chunks]


# (compression, dictionary encoding, rows per row group)
VARIANTS = [("zstd", True, 1 << 20), ("zstd", False, 1 << 16), ("none", True, 1 << 20), ("none", False, 1 << 16)]
LAYOUTS = {"fixed_size_binary": (_binary_column, _read_binary), "fixed_size_list<float16>": (_list_column, _read_list)}


def measure(rows: int, dim: int, folder: str) -> list[dict]:
    """Write one shard per layout and compression, read it back three times, keep the best."""
    emb = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    results = []
    for layout, (make, read) in LAYOUTS.items():
        for compression, dictionary, row_group in VARIANTS:
            path = os.path.join(folder, "shard.parquet")
            pq.write_table(pa.table({"id": np.arange(rows), "embedding": make(emb)}), path, compression=compression,
                           use_dictionary=dictionary, row_group_size=row_group)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                out = read(pq.read_table(path, columns=["embedding"], memory_map=True)["embedding"], dim)
                best = min(best, time.perf_counter() - start)
            assert np.array_equal(np.concatenate(out), emb)
            results.append({"layout": layout, "compression": compression, "dictionary": dictionary,
                            "row_group": row_group, "seconds": best,
                            "gb_per_s": emb.nbytes / best / 1e9, "file_mb": os.path.getsize(path) / 1e6})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--out", default="bench_shard_read.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = measure(args.rows, args.dim, folder)
    print(f"{'layout':26} {'compression':11} {'dict':5} {'row group':>9} {'GB/s':>7} {'file MB':>8}")
    for r in results:
        print(f"{r['layout']:26} {r['compression']:11} {r['dictionary']!s:5} {r['row_group']:9} "
              f"{r['gb_per_s']:7.2f} {r['file_mb']:8.1f}")
    info = {"machine": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count(),
            "pyarrow": pa.__version__, "numpy": np.__version__, "rows": args.rows, "dim": args.dim, "results": results}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
