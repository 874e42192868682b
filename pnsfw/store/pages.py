"""Byte-range reads of Parquet files: known parts of a remote file, and single values of a fixed-width column.

`PartsFile` is a file object over byte ranges fetched beforehand (a footer, a row group's column chunks), so
pyarrow decodes a row group from one batch of concurrent ranged GETs instead of one request per read call.
`PageMap` locates every value of a PLAIN, uncompressed FIXED_LEN_BYTE_ARRAY column chunk (the embedding) from
its data page headers (thrift compact protocol, walked once per row group), so one vector is one ranged read of
its bytes, not a read of the whole column chunk (25 MB for a 50k-row shard of 256-d vectors).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Fetch = Callable[[Sequence[tuple[int, int]]], Sequence[bytes]]  # byte ranges [start, end) -> their bytes
HEADER_WINDOW = 512  # bytes read at a page's start: its header and the definition levels of a full page
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
PLAIN, RLE = 0, 3


class PartsFile(io.RawIOBase):
    """A read-only file of `size` bytes whose known parts are in memory; a read outside them fetches it."""

    def __init__(self, size: int, parts: dict[int, bytes], fetch: Fetch):
        super().__init__()
        self._size, self._fetch, self._pos = size, fetch, 0
        self._parts = sorted(parts.items())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = self._size if n is None or n < 0 else min(self._size, start + n)
        if end <= start:
            return b""
        self._pos = end
        for at, data in self._parts:
            if at <= start and end <= at + len(data):
                return data[start - at:end - at]
        return self._fetch([(start, end)])[0]

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def merge_ranges(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted ranges with those closer than `gap` bytes joined (fewer requests for a few wasted bytes)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# ---- thrift compact protocol: just enough to read a PageHeader
class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def byte(self) -> int:
        value = self.data[self.at]  # IndexError past the window: the caller reads a larger one
        self.at += 1
        return value

    def varint(self) -> int:
        shift = value = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int) -> Any:
        """Read a value of compact type `kind`; structs come back as {field id: value}."""
        if kind in (1, 2):
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.at += 8
            return None
        if kind == 8:
            length = self.varint()
            self.at += length
            return None
        if kind in (9, 10):
            head = self.byte()
            count = head >> 4 if head >> 4 != 15 else self.varint()
            return [self.skip(head & 0x0F) if head & 0x0F not in (1, 2) else bool(self.byte())
                    for _ in range(count)]
        if kind == 11:
            count = self.varint()
            types = self.byte() if count else 0
            return [(self.skip(types >> 4), self.skip(types & 0x0F)) for _ in range(count)]
        if kind == 12:
            return self.struct()
        raise ValueError(f"thrift compact type {kind}")

    def struct(self) -> dict[int, Any]:
        fields: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.zigzag()
            fields[last] = self.skip(kind)


@dataclass
class Page:
    header: int  # bytes of the header
    size: int  # compressed page size (the bytes after the header)
    values: int  # values in the page (nulls included)
    data: int  # offset of the first value from the page start (after the header and the levels)


def parse_page(window: bytes, nullable: bool) -> Page | None:
    """The data page starting `window`; None for a page this reader does not decode by offset (a dictionary
    page, a non-PLAIN encoding, nulls or repetition levels, compressed v2 data). IndexError: window too short."""
    reader = _Reader(window)
    fields = reader.struct()
    kind, size = fields.get(1), fields.get(3)
    if kind == DATA_PAGE and isinstance(fields.get(5), dict):
        page = fields[5]
        if page.get(2) != PLAIN or (nullable and page.get(3) != RLE):
            return None
        values, offset = int(page[1]), reader.at
        if nullable:
            length = int.from_bytes(window[offset:offset + 4], "little")
            if offset + 4 + length > len(window):
                raise IndexError("definition levels past the window")
            if _ones(window[offset + 4:offset + 4 + length], values) != values:
                return None  # nulls: a value's position is not its row's
            offset += 4 + length
        return Page(reader.at, int(size or 0), values, offset)
    if kind == DATA_PAGE_V2 and isinstance(fields.get(8), dict):
        page = fields[8]
        if page.get(4) != PLAIN or page.get(2, 0) or page.get(6, 0) or page.get(7, True):
            return None
        return Page(reader.at, int(size or 0), int(page[1]), reader.at + int(page.get(5, 0)))
    return None


def _ones(levels: bytes, count: int) -> int:
    """How many of the first `count` definition levels (bit width 1, RLE/bit-packed hybrid) are 1."""
    reader, seen, ones = _Reader(levels), 0, 0
    while seen < count and reader.at < len(levels):
        head = reader.varint()
        if head & 1:  # bit-packed: (head >> 1) groups of 8 levels, one byte each
            groups = head >> 1
            bits = np.unpackbits(np.frombuffer(levels, np.uint8, groups, reader.at), bitorder="little")
            reader.at += groups
            take = min(len(bits), count - seen)
            ones, seen = ones + int(bits[:take].sum()), seen + take
        else:
            run = min(head >> 1, count - seen)
            ones, seen = ones + (run if reader.byte() else 0), seen + run
    return ones


@dataclass
class PageMap:
    """Where each row's value lies in one column chunk: page first rows and the offsets of their first values."""

    first_rows: np.ndarray
    offsets: np.ndarray
    width: int

    def ranges(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """The byte range of each row's value (rows within the row group)."""
        page = np.searchsorted(self.first_rows, rows, side="right") - 1
        starts = self.offsets[page] + (rows - self.first_rows[page]) * self.width
        return [(int(a), int(a) + self.width) for a in starts.tolist()]


def page_map(fetch: Fetch, start: int, end: int, rows: int, width: int, nullable: bool) -> PageMap | None:
    """Walk the data pages of the column chunk at [start, end) holding `rows` values of `width` bytes. The
    headers are fetched in one batch at the offsets uniform pages would have (what writers produce), then
    each is checked against the walk; a page elsewhere is fetched on its own. None when a page is not plain."""
    first = _page_at(fetch, start, nullable, {})
    if first is None:
        return None
    stride = first[1].header + first[1].size
    guesses = list(range(start + stride, end, stride)) if stride > 0 else []
    windows = dict(zip(guesses, fetch([(g, min(g + HEADER_WINDOW, end)) for g in guesses]))) if guesses else {}
    windows[start] = first[0]
    at, seen, firsts, offsets = start, 0, [], []
    while at < end and seen < rows:
        found = _page_at(fetch, at, nullable, windows)
        if found is None or found[1].size < 0:
            return None
        page = found[1]
        if page.data - page.header + page.values * width > page.size:
            return None  # not fixed-width plain values: the page is too small for them
        firsts.append(seen)
        offsets.append(at + page.data)
        seen += page.values
        at += page.header + page.size
    if seen != rows:
        return None
    return PageMap(np.array(firsts, np.int64), np.array(offsets, np.int64), width)


def _page_at(fetch: Fetch, at: int, nullable: bool, windows: dict[int, bytes]) -> tuple[bytes, Page] | None:
    """(the header window, the page) at offset `at`, from `windows` or fetched (larger until it parses)."""
    window = windows.get(at) or fetch([(at, at + HEADER_WINDOW)])[0]
    for _ in range(4):
        try:
            page = parse_page(window, nullable)
            return None if page is None else (window, page)
        except IndexError:  # a header (statistics) or levels longer than the window
            if len(window) < HEADER_WINDOW:  # the chunk ends inside it: not a page
                return None
            window = fetch([(at, at + len(window) * 4)])[0]
        except ValueError:
            return None
    return None
