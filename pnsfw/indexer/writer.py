"""Writer stage: buffers projected rows and error rows, commits them to the store in shards."""

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..store import Projection, StoreWriter
from ..store.shards import ERROR_SCHEMA, embedding_array
from .reader import Result


def metadata_columns(rows: list[Result]) -> dict[str, list[str | None]]:
    """The sources' metadata (caption, key, json, extra Parquet/CSV columns) as string columns, in first-seen
    order; a row without a column gets null."""
    names: dict[str, None] = {}
    for row in rows:
        names.update((name, None) for name, _ in row.item.meta)
    if not names:
        return {}
    values = [dict(row.item.meta) for row in rows]
    return {name: [v.get(name) for v in values] for name in names}


class ShardWriter:
    """Commits a shard every `shard_size` rows or `interval` seconds; a commit covers a prefix of the stream."""

    def __init__(self, store: StoreWriter, shard_size: int, interval: float,
                 projection: Projection | None, fit: Callable[[np.ndarray], Projection], fit_rows: int,
                 on_commit: Callable[[int, int], None] = lambda rows, errors: None):
        self.store, self.shard_size, self.interval, self.on_commit = store, shard_size, interval, on_commit
        self.projection, self.fit, self.fit_rows = projection, fit, fit_rows
        self.rows: list[Result] = []
        self.features: list[np.ndarray] = []
        self.errors: list[Result] = []
        self.last_commit = time.monotonic()
        self.committed_rows = 0

    @property
    def pending(self) -> int:
        return len(self.rows)

    def add_error(self, result: Result) -> None:
        self.errors.append(result)
        self._maybe_commit()

    def add(self, results: list[Result], features: np.ndarray) -> None:
        """Rows with their raw CLIP features (projected at commit time, once the projection exists)."""
        self.rows.extend(results)
        self.features.append(features)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        full = len(self.rows) >= self.shard_size or len(self.errors) >= self.shard_size
        due = full or time.monotonic() - self.last_commit >= self.interval
        if due and (self.projection is not None or not self.rows or len(self.rows) >= self.fit_rows):
            self.commit()

    def commit(self) -> None:
        if self.rows and self.projection is None:
            self.projection = self.fit(np.concatenate(self.features))
        while self.rows or self.errors:
            count = min(len(self.rows), self.shard_size)
            self._commit_prefix(count)
        self.last_commit = time.monotonic()

    def _commit_prefix(self, count: int) -> None:
        rows, self.rows = self.rows[:count], self.rows[count:]
        features = np.concatenate(self.features) if self.features else np.zeros((0, 1), np.float32)
        self.features = [features[count:]] if count < len(features) else []
        table = self._table(rows, features[:count]) if rows else None
        # errors go with the first shard of this commit: both are a prefix of the stream
        errors, self.errors = self._errors(self.errors), []
        self.store.commit(table, errors)
        self.committed_rows += count
        self.on_commit(count, 0 if errors is None else errors.num_rows)

    def _table(self, rows: list[Result], features: np.ndarray) -> pa.Table:
        assert self.projection is not None  # fitted by commit() before the first table
        vectors = self.projection.apply(features).astype(np.float16)
        columns = {
            "id": pa.array(self.store.next_ids(len(rows))),
            "uri": pa.array([r.item.uri for r in rows], pa.string()),
            "source": pa.array([r.item.source for r in rows], pa.string()),
            "sha256": pa.array([r.sha256 for r in rows], pa.string()),
            "width": pa.array([r.width for r in rows], pa.int32()),
            "height": pa.array([r.height for r in rows], pa.int32()),
            "embedding": embedding_array(vectors),
        }
        for name, values in metadata_columns(rows).items():
            columns[name] = pa.array(values, pa.string())
        return pa.table(columns)  # the store adds uri_hash and writes its own schema (metadata columns kept)

    @staticmethod
    def _errors(errors: list[Result]) -> pa.Table | None:
        if not errors:
            return None
        fields = {"uri": [e.item.uri for e in errors], "source": [e.item.source for e in errors],
                  "stage": [e.stage for e in errors], "reason": [e.reason for e in errors],
                  "detail": [e.detail[:500] for e in errors]}
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
