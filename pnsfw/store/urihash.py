"""blake2b with an 8-byte digest (RFC 7693) of many short byte strings at once, in numpy, without the GIL.

hashlib has no batch API: one uri at a time it holds the GIL for ~0.35-0.55 us a uri, half of what caps a
one-process import below 1 GB/s (docs/benchmarks.md, import rounds 3-4). Here the rounds run as numpy
operations over uint64 lanes, one lane a message; numpy releases the GIL inside every operation on more than
500 elements, so mapper threads hash in parallel and the GIL is held only for numpy's call overhead.

What keeps that overhead small (round 2's numpy version, one G function at a time on (n,) arrays, cost 0.8-1.1
us a uri and ~2,100 calls a block): the four G functions of a step run as one on (4, n) arrays (the column step
on rows 0-3 of a, b, c and d; the diagonal step on rows 1-4 of b, 2-5 of c and 3-6 of d, which hold copies of
the wrapped rows), and each round's message words are gathered once in the order the steps take them: ~610
numpy calls a block of LANES messages. Every call releases and takes back the GIL, and with several threads
hashing that hand-off (~10 us on the 16-core host, gVisor) is what bounds them, so LANES is large: fewer calls
a message rather than a working set inside the core's L2. Messages are grouped by their number of 128-byte
blocks. Equal to hashlib.blake2b(data, digest_size=8) for every input (tests/test_import.py).
"""

from __future__ import annotations

import functools
import hashlib
import threading

import numpy as np

IV = np.array([0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
               0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179], dtype=np.uint64)
SIGMA = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
         (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4), (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
         (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13), (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
         (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11), (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
         (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5), (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0))
# per round, the message words in the order the steps use them: column x, column y, diagonal x, diagonal y
SCHEDULE = [np.array([s[i] for i in (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)]) for s in SIGMA]
PARAMS = 0x01010000 ^ 8  # depth 1, fanout 1, no key, digest length 8
H0 = IV ^ np.array([PARAMS, 0, 0, 0, 0, 0, 0, 0], np.uint64)
BLOCK = 128
LANES = 16384  # messages hashed together (docs/benchmarks.md, import round 4: fewer numpy calls a message beat
#               keeping the ~8 MB of state in a core's L2; each call is a GIL hand-off, ~10 us under contention)
MIN_LANES = 1024  # fewer messages of one block count are hashed by hashlib
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


class _State:
    """The 16-word working vector of n lanes as (rows, n) arrays a, b, c, d (b, c and d with room for the
    diagonal step's wrapped rows), the round's message words and scratch space: no operation allocates."""

    def __init__(self, n: int):
        self.a = np.empty((4, n), np.uint64)
        self.b = np.empty((5, n), np.uint64)
        self.c = np.empty((6, n), np.uint64)
        self.d = np.empty((7, n), np.uint64)
        self.t = np.empty((4, n), np.uint64)
        self.m = np.empty((16, n), np.uint64)  # the round's words in SCHEDULE order
        b, c, d, m = self.b, self.c, self.d, self.m
        self.column = (self.a, b[:4], c[:4], d[:4], m[0:4], m[4:8], self.t)
        self.diagonal = (self.a, b[1:5], c[2:6], d[3:7], m[8:12], m[12:16], self.t)
        self.wrap = ((b[4], b[0]), (c[4:6], c[0:2]), (d[4:7], d[0:3]))  # (to, from) before the diagonal step
        self.unwrap = tuple((frm, to) for to, frm in self.wrap)

    def compress(self, h: np.ndarray, words: np.ndarray, counter: np.ndarray | np.uint64, last: bool) -> None:
        """h (8, n) = F(h, words (16, n), counter, last), in place."""
        a, b, c, d, m = self.a, self.b, self.c, self.d, self.m
        a[:] = h[:4]
        b[:4] = h[4:]
        c[:4] = IV[:4, None]
        d[:4] = IV[4:, None]
        d[0] ^= counter
        if last:
            d[2] ^= ALL_ONES
        copyto, take = np.copyto, np.take
        for round_ in range(12):
            take(words, SCHEDULE[round_ % 10], axis=0, out=m)
            _g(*self.column)
            for to, frm in self.wrap:
                copyto(to, frm)
            _g(*self.diagonal)
            for to, frm in self.unwrap:
                copyto(to, frm)
        h[:4] ^= a
        h[:4] ^= c[:4]
        h[4:] ^= b[:4]
        h[4:] ^= d[:4]


_ADD, _XOR, _RIGHT, _LEFT, _OR = np.add, np.bitwise_xor, np.right_shift, np.left_shift, np.bitwise_or
_R32, _L32, _R24, _L24, _R16, _L16, _R63, _L63 = (np.uint64(k) for k in (32, 32, 24, 40, 16, 48, 63, 1))


def _g(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, x: np.ndarray, y: np.ndarray,
       t: np.ndarray) -> None:
    """Four G functions at once (rows of a, b, c, d; x, y the message words), in place; t scratch. Written
    out, names bound once: numpy's call overhead (GIL held) is what this costs beside the work (GIL free)."""
    add, xor, right, left, or_ = _ADD, _XOR, _RIGHT, _LEFT, _OR
    add(a, b, out=a), add(a, x, out=a), xor(d, a, out=t)
    right(t, _R32, out=d), left(t, _L32, out=t), or_(d, t, out=d)
    add(c, d, out=c), xor(b, c, out=t)
    right(t, _R24, out=b), left(t, _L24, out=t), or_(b, t, out=b)
    add(a, b, out=a), add(a, y, out=a), xor(d, a, out=t)
    right(t, _R16, out=d), left(t, _L16, out=t), or_(d, t, out=d)
    add(c, d, out=c), xor(b, c, out=t)
    right(t, _R63, out=b), left(t, _L63, out=t), or_(b, t, out=b)


def _padded(windows: np.ndarray, starts: np.ndarray, lengths: np.ndarray, blocks: int) -> np.ndarray:
    """(blocks, 16, n) little-endian message words of each message, zero-padded to `blocks` blocks; `windows`
    is a (len, blocks * 128) sliding-window view of the data (zero-padded at its end)."""
    width = blocks * BLOCK
    out = windows[starts]  # each message's bytes and what follows them, one row a message
    out *= np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]  # ... the bytes after it zeroed
    return np.ascontiguousarray(out.view("<u8").reshape(len(starts), blocks, 16).transpose(1, 2, 0))


def _hash_group(windows: np.ndarray, starts: np.ndarray, lengths: np.ndarray, blocks: int,
                state: _State) -> np.ndarray:
    """Digests of n <= LANES messages of `blocks` blocks each."""
    n = len(starts)
    words = _padded(windows, starts, lengths, blocks)
    h = np.repeat(H0[:, None], n, axis=1)
    for block in range(blocks):
        last = block == blocks - 1
        counter = lengths.astype(np.uint64) if last else np.uint64((block + 1) * BLOCK)
        state.compress(h, words[block], counter, last)
    digests: np.ndarray = h[0]
    return digests


def _hashlib_64(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The same digests one message at a time (hashlib): cheaper than the lanes' fixed overhead for a few."""
    digest = functools.partial(hashlib.blake2b, digest_size=8)
    raw = data.tobytes()
    joined = b"".join([digest(raw[s:s + n]).digest() for s, n in zip(starts.tolist(), lengths.tolist())])
    return np.frombuffer(joined, "<u8")


def _state(n: int) -> _State:
    """This thread's working vector for n lanes (kept: a mapper thread hashes chunks of one size)."""
    states: dict[int, _State] = _local.__dict__.setdefault("states", {})
    if n not in states:
        if len(states) > 2:
            states.clear()
        states[n] = _State(n)
    return states[n]


_local = threading.local()


def blake2b_64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint64 (the little-endian 8-byte digest) of each message data[offsets[i]:offsets[i + 1]] (data uint8).

    Messages are grouped by their number of blocks; a group of fewer than MIN_LANES goes to hashlib, a larger
    one is hashed in parts of at most LANES lanes (of equal size, so that no part is left small)."""
    starts, lengths = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
    out = np.empty(len(lengths), np.uint64)
    blocks = np.maximum(1, (lengths + BLOCK - 1) // BLOCK)
    counts = np.unique(blocks).tolist()
    for count in counts:
        group = np.nonzero(blocks == count)[0] if len(counts) > 1 else None  # None: every message
        group_starts = starts if group is None else starts[group]
        group_lengths = lengths if group is None else lengths[group]
        if len(group_starts) < MIN_LANES:
            out[group] = _hashlib_64(data, group_starts, group_lengths)
            continue
        base, end = int(group_starts[0]), int(group_starts[-1] + group_lengths[-1])
        padded = np.concatenate([data[base:end], np.zeros(count * BLOCK, np.uint8)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, count * BLOCK)
        size = -(-len(group_starts) // -(-len(group_starts) // LANES))
        digests = np.concatenate([
            _hash_group(windows, group_starts[i:i + size] - base, group_lengths[i:i + size], count,
                        _state(len(group_starts[i:i + size])))
            for i in range(0, len(group_starts), size)])
        if group is None:
            return digests
        out[group] = digests
    return out
