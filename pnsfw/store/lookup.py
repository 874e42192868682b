"""Rows by id without loading the item table: the manifest's id ranges find the shard, the footer the row group.

`IdMap` turns ids into row positions (the order of `Store.table()`) and back from the shard list alone, in
O(shards) memory. `RowGroups` reads the row group(s) holding the wanted ids, keeping shard footers and
recently read row groups in a bounded cache (a searcher asks for the uris of every hit); `RowGroups.values`
reads single fixed-width values (a vector) by byte range.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotFound, StoreError
from .fs import FileSystem
from .pages import Fetch, PageMap, PartsFile, merge_ranges, page_map
from .records import Shard

CACHE_BYTES = 256 << 20  # decoded row groups a long-lived reader keeps (uris of search hits, item metadata)
FOOTERS = 65536  # shard footers (a few KB each) and page maps kept
FOOTER_READ = 64 << 10  # the suffix read for a footer (a shard's is a few KB; a longer one takes a second read)
MERGE_GAP = 8 << 10  # column chunks of a row group closer than this are read in one request (as pyarrow's
# pre-buffer joins holes up to 8 KiB); farther ones are separate ranged GETs, concurrent
MAX_VALUE_READS = 4096  # more rows of one row group than this: the group is read whole


class StringColumn:
    """A string column read by row straight from its Arrow buffers (a pyarrow `take` costs ~0.5 ms a call)."""

    def __init__(self, column: Any):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        array = array.cast(pa.large_string())
        _, offsets, data = array.buffers()
        self.offsets = np.frombuffer(offsets, np.int64)[array.offset: array.offset + len(array) + 1]
        self.data = memoryview(data) if data is not None else memoryview(b"")
        self.nbytes = int(self.offsets.nbytes + len(self.data))

    def take(self, rows: np.ndarray) -> list[str]:
        """The strings at `rows` (row positions, not ids)."""
        starts, data = self.offsets, self.data
        rows = np.asarray(rows, dtype=np.int64)
        return [str(data[a:b], "utf-8") for a, b in zip(starts[rows].tolist(), starts[rows + 1].tolist())]


class IdMap:
    """Store ids <-> row positions (manifest shard order) from the shards' id ranges (ids are sequential)."""

    def __init__(self, shards: Sequence[Shard]):
        for shard in shards:
            if shard.rows != shard.max_id - shard.min_id + 1:
                raise StoreError(f"shard {shard.name} lists ids {shard.min_id}..{shard.max_id} for {shard.rows} "
                                 "rows (ids must be sequential); run `pnsfw repair`")
        self.names = [s.name for s in shards]
        starts = np.array([s.min_id for s in shards], np.int64)
        self.rows_before = np.concatenate([[0], np.cumsum([s.rows for s in shards], dtype=np.int64)])
        self._by_id = np.argsort(starts, kind="stable")  # shard positions by first id
        self._starts = starts[self._by_id]
        self._ends = np.array([s.max_id for s in shards], np.int64)[self._by_id]
        self.min_ids = starts

    @property
    def rows(self) -> int:
        return int(self.rows_before[-1])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, row within the shard) of each id; -1, -1 where no shard holds it."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if not len(self._starts):
            return np.full(len(ids), -1, np.int64), np.full(len(ids), -1, np.int64)
        at = np.searchsorted(self._starts, ids, side="right") - 1
        known = (at >= 0) & (ids <= self._ends[at.clip(0)])
        shard = np.where(known, self._by_id[at.clip(0)], -1)
        return shard, np.where(known, ids - self.min_ids[shard.clip(0)], -1)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ids (-1 where unknown)."""
        shard, within = self.locate(ids)
        return np.where(shard >= 0, self.rows_before[shard.clip(0)] + within, -1)

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        """Ids at row positions (0 <= row < rows)."""
        rows = np.asarray(rows, np.int64)
        shard = np.searchsorted(self.rows_before, rows, side="right") - 1
        ids: np.ndarray = self.min_ids[shard] + rows - self.rows_before[shard]
        return ids

    def all_ids(self) -> np.ndarray:
        """Every id in row order (8 bytes a row: for whole-store work, not for per-request state)."""
        return self.ids_of(np.arange(self.rows, dtype=np.int64))

    def require(self, ids: np.ndarray, root: str) -> tuple[np.ndarray, np.ndarray]:
        """locate(), raising NotFound naming the first unknown id."""
        shard, within = self.locate(ids)
        if (shard < 0).any():
            raise NotFound(f"id {int(np.asarray(ids).reshape(-1)[np.argmax(shard < 0)])} is not in store {root}")
        return shard, within


@dataclass
class Footer:
    """A shard's parsed footer: metadata, first row of each row group (+ total), its size, column positions."""

    meta: pq.FileMetaData
    starts: np.ndarray
    size: int
    columns: dict[str, int]


class RowGroups:
    """Reads of single row groups (and single values) of a store's shards through its FileSystem: footers,
    page maps and decoded groups cached (LRU, bounded), keyed by shard name and checksum (a shard rewritten
    under its name, by repair or a restore, is read afresh).

    On an object store a footer and the shard's size check are one suffix GET, a row group one batch of
    concurrent ranged GETs of its column chunks, and a vector one ranged GET of its bytes (pages.PageMap)."""

    def __init__(self, fs: FileSystem, entry: Callable[[str], Shard], damaged: Callable[[str, str], Exception],
                 budget: int = CACHE_BYTES):
        """`entry(name)`: the manifest's record of a shard (its size and checksum); `damaged(name, what)`: the
        error for a shard that cannot be read."""
        self.fs, self._entry, self._damaged, self.budget = fs, entry, damaged, budget
        self._footers: OrderedDict[tuple[str, str], Footer] = OrderedDict()
        self._pages: OrderedDict[tuple[Any, ...], PageMap | None] = OrderedDict()
        self._groups: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def _fetch(self, name: str) -> Fetch:
        rel = f"shards/{name}"
        return lambda ranges: self.fs.read_ranges(rel, list(ranges))

    def _unreadable(self, name: str, exc: BaseException) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return self._damaged(name, "is missing")
        return self._damaged(name, f"cannot be read ({str(exc).splitlines()[0][:120] if str(exc) else exc!r})")

    def footer(self, name: str) -> tuple[pq.FileMetaData, np.ndarray]:
        """(footer, first row of each row group + total) of shard `name`."""
        found = self._footer(name)
        return found.meta, found.starts

    def _footer(self, name: str) -> Footer:
        entry = self._entry(name)
        key = (name, entry.sha256)
        with self._lock:
            hit = self._footers.get(key)
            if hit is not None:
                self._footers.move_to_end(key)
                return hit
        try:
            tail, size = self.fs.read_tail(f"shards/{name}", FOOTER_READ)
        except OSError as exc:
            raise self._unreadable(name, exc) from None
        if size != entry.bytes:
            raise self._damaged(name, f"has {size} bytes, the manifest says {entry.bytes}")
        try:
            meta = pq.ParquetFile(PartsFile(size, {size - len(tail): tail}, self._fetch(name))).metadata
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(name, exc) from None
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        columns = {meta.schema.column(j).path: j for j in range(meta.num_columns)}
        found = Footer(meta, np.concatenate([[0], np.cumsum(rows)]).astype(np.int64), size, columns)
        with self._lock:
            self._footers[key] = found
            while len(self._footers) > FOOTERS:
                self._footers.popitem(last=False)
        return found

    def group_of(self, name: str, within: np.ndarray) -> np.ndarray:
        """Row group index of each row within shard `name`."""
        _, starts = self.footer(name)
        return np.searchsorted(starts, within, side="right") - 1

    def read(self, name: str, group: int, columns: list[str], cache: bool = True) -> pa.Table:
        """One row group of `columns` (those the shard has)."""
        key = (name, self._entry(name).sha256, group, tuple(columns), "table")
        return self._cached(key, cache, lambda: self._read(name, group, columns), lambda t: int(t.nbytes))

    def strings(self, name: str, group: int, column: str) -> StringColumn:
        """One row group's string column, ready for cheap row takes."""
        key = (name, self._entry(name).sha256, group, column, "strings")
        def load() -> StringColumn:
            return StringColumn(self._read(name, group, [column]).column(0))

        strings: StringColumn = self._cached(key, True, load, lambda s: s.nbytes)
        return strings

    def values(self, name: str, group: int, column: str, rows: np.ndarray) -> np.ndarray | None:
        """The raw bytes (n, width) of fixed-width column `column` at `rows` of one row group, read by byte
        range; None when its pages do not allow that (compressed, dictionary, nulls) or for many rows."""
        found = self._footer(name)
        index = found.columns.get(column)
        if index is None or len(rows) > MAX_VALUE_READS:
            return None
        chunk, schema = found.meta.row_group(group).column(index), found.meta.schema.column(index)
        if chunk.physical_type != "FIXED_LEN_BYTE_ARRAY" or chunk.compression != "UNCOMPRESSED":
            return None
        key = (name, self._entry(name).sha256, group, column)
        with self._lock:
            known = key in self._pages
            pages = self._pages.get(key)
        if not known:
            start = _chunk_start(chunk)
            try:
                pages = page_map(self._fetch(name), start, start + chunk.total_compressed_size,
                                 found.meta.row_group(group).num_rows, schema.length, schema.max_definition_level > 0)
            except OSError as exc:
                raise self._unreadable(name, exc) from None
            with self._lock:
                self._pages[key] = pages
                while len(self._pages) > FOOTERS:
                    self._pages.popitem(last=False)
        if pages is None:
            return None
        try:
            data = self.fs.read_ranges(f"shards/{name}", pages.ranges(np.asarray(rows, np.int64)))
        except OSError as exc:
            raise self._unreadable(name, exc) from None
        return np.frombuffer(b"".join(data), np.uint8).reshape(len(rows), pages.width)

    def _read(self, name: str, group: int, columns: list[str]) -> pa.Table:
        found = self._footer(name)
        present = [c for c in columns if c in found.columns]
        try:
            if self.fs.local:
                source: Any = self.fs.open_ranges(f"shards/{name}")
            else:  # the column chunks in one batch of concurrent ranged GETs; the footer is known
                chunks = [found.meta.row_group(group).column(found.columns[c]) for c in present]
                ranges = merge_ranges([(_chunk_start(c), _chunk_start(c) + c.total_compressed_size)
                                       for c in chunks], MERGE_GAP)
                data = self.fs.read_ranges(f"shards/{name}", ranges)
                parts = {start: part for (start, _), part in zip(ranges, data)}
                source = PartsFile(found.size, parts, self._fetch(name))
            with _opened(source) as opened:
                return pq.ParquetFile(opened, metadata=found.meta, pre_buffer=self.fs.local).read_row_group(
                    group, columns=present)
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(name, exc) from None

    def _cached(self, key: tuple[Any, ...], cache: bool, load: Callable[[], Any], size: Callable[[Any], int]) -> Any:
        with self._lock:
            hit = self._groups.get(key)
            if hit is not None:
                self._groups.move_to_end(key)
                return hit[0]
        value = load()
        if not cache:
            return value
        nbytes = size(value)
        with self._lock:
            if key not in self._groups and nbytes <= self.budget:
                self._groups[key] = (value, nbytes)
                self._held += nbytes
                while self._held > self.budget:
                    _, (_, freed) = self._groups.popitem(last=False)
                    self._held -= freed
        return value


def _chunk_start(chunk: Any) -> int:
    """The first byte of a column chunk (its dictionary page when it has one)."""
    if chunk.has_dictionary_page and chunk.dictionary_page_offset and chunk.dictionary_page_offset > 0:
        return int(min(chunk.dictionary_page_offset, chunk.data_page_offset))
    return int(chunk.data_page_offset)


@contextmanager
def _opened(source: Any) -> Iterator[Any]:
    """A path as is; a file object closed afterwards."""
    try:
        yield source
    finally:
        if hasattr(source, "close"):
            source.close()


def by_group(names: list[str], groups: RowGroups, shard: np.ndarray, within: np.ndarray
             ) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """The wanted rows grouped by (shard, row group): (name, group, positions in the request, rows in group)."""
    out = []
    for s in np.unique(shard).tolist():
        picked = np.flatnonzero(shard == s)
        name = names[s]
        group = groups.group_of(name, within[picked])
        _, starts = groups.footer(name)
        for g in np.unique(group).tolist():
            mine = picked[group == g]
            out.append((name, int(g), mine, within[mine] - starts[g]))
    return out
