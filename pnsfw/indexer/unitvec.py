"""Validate and L2-normalise embedding chunks at memory speed: fp16/fp32 (n, width) -> codes + fp16 unit rows.

numpy's float16 casts run ~2-5 ns per element on the machines we measured (no F16C path), more than the whole
budget of a 1 GB/s import, so the arithmetic runs in torch on the CPU, one thread (two threads on a shared
2-core machine were measured 5x slower), in cache-sized blocks. A row is bad when its norm is not finite
(a NaN or inf element makes it so) or is zero. fp16 rows already of unit length within fp16 rounding
(what clip-retrieval writes) are kept bit for bit, so the common case copies nothing.

Large arrays come from Arrow's memory pool (`pooled_empty`): numpy maps fresh pages for every array of more
than a few MB and returns them when it is freed, so each 64 MB chunk paid its page faults again (12-48 ms a
chunk on the 2-core VM, ad-hoc timing); the pool hands freed pages back (docs/benchmarks.md, import round 3).

fp16 rows are first checked without torch (`half_checks`: their squared norms from the fp16 bits in numpy
integer ops, ~1 ns an element on one core, the GIL released inside each call), so an import of unit-length rows
(clip-retrieval's) never imports torch (~2.5-5 s of a cold run); torch is imported only for a block that needs
rescaling, or for rows of other dtypes.
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


HALF_BLOCK = 1024  # rows checked per numpy call sequence: the block's two uint32 scratch arrays stay in L2
_MAGNITUDE = np.uint32(0x7FFF << 13)  # an fp16's exponent and mantissa, moved to fp32's places
_REBIAS = np.uint32(112 << 23)  # fp16 exponent bias 15 -> fp32's 127


def half_squared_norms(words: np.ndarray, scratch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Squared norms of fp16 rows given as uint32 pairs (n, width / 2), without converting in float16.

    Each half's magnitude bits become an fp32 by a shift, a mask and an exponent rebias: exact for normal
    values; zeros and subnormals come out as about 2^-15 (so a row's sum is off by at most width * 2^-30,
    checked exactly by half_checks where it matters) and inf/NaN as >= 2^16 (likewise)."""
    n = len(words)
    low, high = scratch[0][:n], scratch[1][:n]
    np.left_shift(words, 13, out=low)
    np.bitwise_and(low, _MAGNITUDE, out=low)
    np.add(low, _REBIAS, out=low)
    np.right_shift(words, 3, out=high)
    np.bitwise_and(high, _MAGNITUDE, out=high)
    np.add(high, _REBIAS, out=high)
    low_f, high_f = low.view(np.float32), high.view(np.float32)
    squared: np.ndarray = np.einsum("ij,ij->i", low_f, low_f) + np.einsum("ij,ij->i", high_f, high_f)
    return squared


def half_checks(x: np.ndarray, codes: np.ndarray, scratch: tuple[np.ndarray, np.ndarray]) -> bool:
    """Codes of fp16 rows x (C order, even width) into `codes`; True when every good row is of unit length
    within UNIT_TOLERANCE (the rows can be kept as they are). Rows whose estimate is near zero or past fp16's
    range are checked exactly (zero: every element +-0; not finite: an inf or NaN element)."""
    width = x.shape[1]
    squared = half_squared_norms(x.view(np.uint32), scratch)
    codes[:] = 0
    for row in np.nonzero(squared <= width * 2.0 ** -29)[0]:
        codes[row] = ZERO if not (x[row].view(np.uint16) & 0x7FFF).any() else 0
    for row in np.nonzero(~(squared < 4.0e9))[0]:
        codes[row] = NOT_FINITE if not np.isfinite(x[row]).all() else 0
    good = codes == 0
    return bool((np.abs(np.sqrt(squared[good]) - 1) <= UNIT_TOLERANCE).all())


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8: 0 ok, NOT_FINITE, ZERO; fp16 (n, width) rows divided by their norm; bad rows left as given).

    fp16 rows (C order, even width) are checked block by block in numpy (half_checks); a block of unit-length
    rows is kept bit for bit, and only a block that needs rescaling goes through torch (_torch_rows)."""
    n, width = x.shape
    codes = np.zeros(n, np.int8)
    if not (x.dtype == np.float16 and x.flags.c_contiguous and width % 2 == 0):
        return codes, _torch_rows(x, codes, range(0, n, BLOCK))
    scratch = (np.empty((HALF_BLOCK, width // 2), np.uint32), np.empty((HALF_BLOCK, width // 2), np.uint32))
    rescale = [start for start in range(0, n, HALF_BLOCK)
               if not half_checks(x[start:start + HALF_BLOCK], codes[start:start + HALF_BLOCK], scratch)]
    if not rescale:
        return codes, x
    return codes, _torch_rows(x, codes, rescale, HALF_BLOCK)


def _torch_rows(x: np.ndarray, codes: np.ndarray, starts: "range | list[int]", size: int = BLOCK) -> np.ndarray:
    """Codes and unit rows of the blocks of x at `starts` (of `size` rows, in order), by torch on one thread;
    the other rows are kept as they are (a copy of x is made at the first block that needs rescaling)."""
    import torch

    n, width = x.shape
    if x.dtype == np.float16 and x.flags.c_contiguous:
        out = x  # replaced by a copy at the first block that needs rescaling
    else:
        out = pooled_empty((n, width), np.float16)  # every block is written: starts covers all of x
    source, target = _tensor(np.ascontiguousarray(x)), None
    buffer = torch.empty((min(size, n), width), dtype=torch.float32)
    with one_thread():
        for start in starts:
            stop = min(n, start + size)
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
                out[:] = x  # the blocks not rescaled stay as given
            target = target if target is not None else _tensor(out)
            block.div_(torch.where(ok, norms, 1.0)[:, None])
            target[start:stop].copy_(block)
    return out
