"""Validate and L2-normalise embedding chunks at memory speed: fp16/fp32 (n, width) -> codes + fp16 unit rows.

numpy's float16 casts run ~2-5 ns per element on the machines we measured (no F16C path), more than the whole
budget of a 1 GB/s import, so the arithmetic runs in torch on the CPU, one thread (two threads on a shared
2-core machine were measured 5x slower), in cache-sized blocks. A row is bad when its norm is not finite
(a NaN or inf element makes it so) or is zero. fp16 rows already of unit length within fp16 rounding
(what clip-retrieval writes) are kept bit for bit, so the common case copies nothing.

Large arrays come from Arrow's memory pool (`pooled_empty`): numpy maps fresh pages for every array of more
than a few MB and returns them when it is freed, so each 64 MB chunk paid its page faults again (12-48 ms a
chunk on the 2-core VM, ad-hoc timing); the pool hands freed pages back (docs/benchmarks.md, import round 3).
"""

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

BLOCK = 8192
UNIT_TOLERANCE = 2e-3  # |norm - 1| of fp16 rows that were unit length before rounding (512-1280 elements)
NOT_FINITE, ZERO = 2, 3  # codes of importer.REASONS


_threads = threading.Lock()
_inside = [0, 0]  # callers inside one_thread now, torch's thread count before the first of them


@contextmanager
def one_thread() -> Iterator[None]:
    """torch ops on the calling thread only (the setting is process-wide: with several mapper threads inside,
    the first one in sets it and the last one out restores it)."""
    import torch

    with _threads:
        if not _inside[0]:
            _inside[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _inside[0] += 1
    try:
        yield
    finally:
        with _threads:
            _inside[0] -= 1
            if not _inside[0]:
                torch.set_num_threads(_inside[1])


def pooled_empty(shape: tuple[int, int], dtype: "np.dtype | type") -> np.ndarray:
    """A writable, uninitialised C-order array in memory of Arrow's default pool (reused pages)."""
    dtype = np.dtype(dtype)
    count = shape[0] * shape[1]
    if not count:
        return np.empty(shape, dtype)
    buffer = pa.allocate_buffer(count * dtype.itemsize)
    return np.frombuffer(buffer, dtype, count).reshape(shape)


def _tensor(x: np.ndarray) -> Any:
    import torch

    with warnings.catch_warnings():  # a read-only memory map: torch warns, and nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8: 0 ok, NOT_FINITE, ZERO; fp16 (n, width) rows divided by their norm; bad rows left as given)."""
    import torch

    n, width = x.shape
    codes = np.zeros(n, np.int8)
    if x.dtype == np.float16 and x.flags.c_contiguous:
        out = x  # replaced by a copy at the first block that needs rescaling
    else:
        out = pooled_empty((n, width), np.float16)
    source, target = _tensor(np.ascontiguousarray(x)), None
    buffer = torch.empty((min(BLOCK, n), width), dtype=torch.float32)
    with one_thread():
        for start in range(0, n, BLOCK):
            stop = min(n, start + BLOCK)
            block = buffer[:stop - start]
            block.copy_(source[start:stop])
            norms = torch.linalg.vector_norm(block, dim=1)
            finite = torch.isfinite(norms)
            ok = finite & (norms > 1e-12)
            codes[start:stop] = np.where(finite.numpy(), np.where(ok.numpy(), 0, ZERO), NOT_FINITE)
            if out is x and bool(((norms - 1).abs() <= UNIT_TOLERANCE).logical_or_(~ok).all()):
                continue
            if out is x:
                out = pooled_empty((n, width), np.float16)
                out[:start] = x[:start]
            target = target if target is not None else _tensor(out)
            block.div_(torch.where(ok, norms, 1.0)[:, None])
            target[start:stop].copy_(block)
    return codes, out
