"""Writer stage: buffers projected rows and error rows, commits them to the store in shards."""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from ..store import Projection, StoreWriter
from ..store.shards import ERROR_SCHEMA, column_array, embedding_array, number_array, string_array
from .reader import Result


class _Batch(NamedTuple):
    """One batch's rows made ready for a shard as it arrives (on the writer thread, while the device encodes the
    next ones): their columns, and their vectors projected to fp16, or raw CLIP features until a PCA is fitted.
    A commit then only joins the batches: a 20k-row final commit took 0.71-1.04 s on 2 cores before, 0.08-0.14 s
    since (docs/benchmarks.md); its projection had been 0.24 s, pyarrow's first `pa.array` importing pandas
    ~0.3 s."""

    columns: dict[str, pa.Array]  # ROW_COLUMNS
    meta: dict[str, tuple[pa.Array, np.ndarray]]  # the sources' metadata columns: values, which rows have one
    vectors: np.ndarray
    projected: bool

    def __len__(self) -> int:
        return len(self.vectors)

    def cut(self, count: int) -> tuple["_Batch", "_Batch"]:
        """The first `count` rows, and the rest (each with the metadata columns its own rows have)."""
        def part(start: int, stop: int) -> "_Batch":
            meta = {k: (v.slice(start, stop - start), has[start:stop]) for k, (v, has) in self.meta.items()
                    if has[start:stop].any()}
            return _Batch({k: v.slice(start, stop - start) for k, v in self.columns.items()}, meta,
                          self.vectors[start:stop], self.projected)
        return part(0, count), part(count, len(self))


ROW_COLUMNS = {"uri": pa.string(), "source": pa.string(), "sha256": pa.string(), "width": pa.int32(),
               "height": pa.int32()}


def _row_columns(rows: list[Result]) -> dict[str, pa.Array]:
    """The rows' fixed columns, built without `pa.array` (it imports pandas: `shards.string_array`)."""
    values: dict[str, list[Any]] = {"uri": [r.item.uri for r in rows], "source": [r.item.source for r in rows],
                                    "sha256": [r.sha256 for r in rows], "width": [r.width for r in rows],
                                    "height": [r.height for r in rows]}
    return {name: column_array(values[name], kind) for name, kind in ROW_COLUMNS.items()}


def _meta_columns(rows: list[Result]) -> dict[str, tuple[pa.Array, np.ndarray]]:
    """The sources' metadata (caption, key, json, extra Parquet/CSV columns) as string columns in first-seen
    order, each with which rows have it (a row without gets null)."""
    if not any(row.item.meta for row in rows):
        return {}
    values = [dict(row.item.meta) for row in rows]
    names = dict.fromkeys(name for row in values for name in row)
    return {name: (string_array(row.get(name) for row in values), np.array([name in row for row in values]))
            for name in names}


class ShardWriter:
    """Commits a shard every `shard_size` rows or `interval` seconds; a commit covers a prefix of the stream."""

    def __init__(self, store: StoreWriter, shard_size: int, interval: float,
                 projection: Projection | None, fit: Callable[[np.ndarray], Projection], fit_rows: int,
                 on_commit: Callable[[int, int], None] = lambda rows, errors: None):
        self.store, self.shard_size, self.interval, self.on_commit = store, shard_size, interval, on_commit
        self.projection, self.fit, self.fit_rows = projection, fit, fit_rows
        self.batches: list[_Batch] = []
        self.count = 0  # rows in self.batches
        self.errors: list[Result] = []
        self.last_commit = time.monotonic()
        self.committed_rows = 0

    @property
    def pending(self) -> int:
        return self.count

    def add_error(self, result: Result) -> None:
        self.errors.append(result)
        self._maybe_commit()

    def add(self, results: list[Result], features: np.ndarray) -> None:
        """Rows with their raw CLIP features (projected now, or at the commit that fits the projection)."""
        if results:
            raw = self.projection is None
            vectors = np.asarray(features, np.float32) if raw else self._project(features)
            self.batches.append(_Batch(_row_columns(results), _meta_columns(results), vectors, not raw))
            self.count += len(results)
        self._maybe_commit()

    def _project(self, features: np.ndarray) -> np.ndarray:
        assert self.projection is not None
        return self.projection.apply(features).astype(np.float16)

    def _maybe_commit(self) -> None:
        full = self.count >= self.shard_size or len(self.errors) >= self.shard_size
        due = full or time.monotonic() - self.last_commit >= self.interval
        if due and (self.projection is not None or not self.count or self.count >= self.fit_rows):
            self.commit()

    def commit(self) -> None:
        if self.count and self.projection is None:  # every pending batch is raw until the fit
            self.projection = self.fit(np.concatenate([b.vectors for b in self.batches]))
        while self.count or self.errors:
            self._commit_prefix(min(self.count, self.shard_size))
        self.last_commit = time.monotonic()

    def _take(self, count: int) -> list[_Batch]:
        """The first `count` pending rows, as batches (the last one cut where the shard ends)."""
        taken: list[_Batch] = []
        need = count
        while need:
            batch = self.batches.pop(0)
            if len(batch) > need:
                batch, rest = batch.cut(need)
                self.batches.insert(0, rest)
            taken.append(batch)
            need -= len(batch)
        self.count -= count
        return taken

    def _commit_prefix(self, count: int) -> None:
        batches = self._take(count)
        table = self._table(batches) if count else None
        # errors go with the first shard of this commit: both are a prefix of the stream
        errors, self.errors = self._errors(self.errors), []
        self.store.commit(table, errors)
        self.committed_rows += count
        self.on_commit(count, 0 if errors is None else errors.num_rows)

    def _table(self, batches: list[_Batch]) -> pa.Table:
        vectors = np.concatenate([b.vectors if b.projected else self._project(b.vectors) for b in batches])
        columns = {"id": number_array(self.store.next_ids(len(vectors)), pa.int64())}
        columns.update((name, pa.concat_arrays([b.columns[name] for b in batches])) for name in ROW_COLUMNS)
        columns["embedding"] = embedding_array(vectors)
        names = dict.fromkeys(name for b in batches for name in b.meta)  # first-seen order; a row without: null
        for name in names:
            columns[name] = pa.concat_arrays([b.meta[name][0] if name in b.meta else pa.nulls(len(b), pa.string())
                                              for b in batches])
        return pa.table(columns)  # the store adds uri_hash and writes its own schema (metadata columns kept)

    @staticmethod
    def _errors(errors: list[Result]) -> pa.Table | None:
        if not errors:
            return None
        fields = [string_array(e.item.uri for e in errors), string_array(e.item.source for e in errors),
                  string_array(e.stage for e in errors), string_array(e.reason for e in errors),
                  string_array(e.detail[:500] for e in errors)]
        return pa.table(fields, schema=ERROR_SCHEMA)


WRITER_DEPTH = 16  # calls queued for the writer thread (a batch's rows and features, or one error row, each)


class WriterThread:
    """A ShardWriter's calls made on a thread of their own, in the order they were made here: projection,
    Parquet encoding, hashing and the commit's writes and fsyncs leave the caller's thread (the encoder's on the
    GPU path: 12.8 s of a 1M run on an H200, docs/benchmarks.md, round 6). Same shards, ids and commits as the
    ShardWriter alone: one thread makes every call, in order. At most `depth` calls wait; a failure there is
    raised by the caller's next call. `close(discard=True)` (a stopped or failed run) drops what waits and
    returns once the commit in progress, if any, has finished: committed rows are exactly what the store lists,
    as when the caller's thread committed."""

    def __init__(self, shards: ShardWriter, depth: int = WRITER_DEPTH, name: str = "pnsfw-writer"):
        import queue
        import threading

        self.shards = shards
        self.calls: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.discard = threading.Event()
        self.busy_s = 0.0  # seconds the thread spent in the ShardWriter's calls
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        return self.shards.pending

    def _run(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.discard.is_set() or self.error is not None:
                continue  # drain, so the caller never waits on a full queue
            started = time.perf_counter()
            try:
                getattr(self.shards, call[0])(*call[1:])
            except BaseException as exc:  # raised on the caller's thread by its next call
                self.error = exc
            self.busy_s += time.perf_counter() - started

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            self.discard.set()
            raise error

    def _put(self, call: tuple | None) -> None:
        import queue

        while True:
            self._raise()
            try:
                self.calls.put(call, timeout=0.2)  # a timeout: Ctrl-C is not held up by a full queue
                return
            except queue.Full:
                continue

    def add(self, results: list[Result], features: np.ndarray) -> None:
        self._put(("add", results, features))

    def add_error(self, result: Result) -> None:
        self._put(("add_error", result))

    def commit(self) -> None:
        """Commit everything passed so far, on the thread, and end it; raises what failed there."""
        self._put(("commit",))
        self._put(None)
        self._join()
        self._raise()

    def _join(self) -> None:
        while self.thread.is_alive():
            self.thread.join(timeout=0.2)

    def close(self, discard: bool = False) -> None:
        """End the thread (after what was passed, or, with `discard`, after the call in progress only)."""
        if not self.thread.is_alive():
            return
        if discard:
            self.discard.set()
        self.calls.put(None)  # the thread drains the queue, so this cannot block for long
        self._join()
