"""The bulk-scoring pipeline: shards -> reader threads -> engine (one thread, in order) -> writer threads -> progress.

Reader threads read a shard and stage its rows for the engine (pinned memory for CUDA); the calling thread
submits staged shards to the engine in shard order; writer threads wait for the outputs, build the score
table and write the part (fsynced, renamed); the calling thread then records finished parts in progress in
shard order, for the contiguous prefix only, in one progress write every PROGRESS_EVERY_S seconds or
PROGRESS_EVERY_PARTS parts. A part whose progress entry was never written is simply scored again on the
next run, so batching the progress writes loses at most that much work on a crash.
Memory is bounded: readers + 2 shards of input, and 2 x writers shards of outputs.
"""

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..concurrency import read_ahead
from .engines import Engine, Waiter

PROGRESS_EVERY_S = 0.5
PROGRESS_EVERY_PARTS = 64

ReadShard = Callable[[Any], tuple[np.ndarray, Any]]  # a shard (record or path) ->  # ids, rows for Engine.prepare
WritePart = Callable[[str, np.ndarray, np.ndarray], None]
CommitParts = Callable[[list[tuple[str, int]]], None]


def default_threads() -> tuple[int, int]:
    """(readers, writers) for this machine. Writers spend much of their time waiting (GPU outputs, fsync),
    so there are more of them than cores would suggest; readers are CPU-bound (decode, staging copy)."""
    cores = len(os.sched_getaffinity(0))
    return min(8, max(2, cores // 2)), min(16, max(2, cores))


@dataclass
class StageTimes:
    """Thread-seconds per stage (summed over the threads that ran it) and the calling thread's waits."""

    readers: int = 0
    writers: int = 0
    read_s: float = 0.0  # read the shard + stage it for the engine
    submit_s: float = 0.0  # engine.submit on the calling thread (the whole forward for CPU engines)
    engine_wait_s: float = 0.0  # writers waiting for outputs (H2D + forward + D2H on a GPU)
    write_s: float = 0.0  # score table + Parquet part + fsync, outputs wait excluded
    commit_s: float = 0.0  # progress writes
    progress_writes: int = 0
    wait_read_s: float = 0.0  # the calling thread starved of shards: readers are the bottleneck
    wait_write_s: float = 0.0  # the calling thread held back by the writers
    cpu_s: float = 0.0  # process CPU time (user + system) over the run
    main_cpu_s: float = 0.0  # CPU time of the calling thread: the serial part, which bounds shards/s

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _timed(call: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return call(*args), time.perf_counter() - started


class BatchedCommits:
    """Finished parts in shard order; commits the contiguous prefix in batches (also used by the Ray runner)."""

    def __init__(self, commit: CommitParts, times: StageTimes):
        self.commit, self.times = commit, times
        self.ready: list[tuple[str, int]] = []
        self.last = time.perf_counter()

    def add(self, name: str, rows: int) -> None:
        self.ready.append((name, rows))
        self.flush(force=False)

    def flush(self, force: bool) -> None:
        due = len(self.ready) >= PROGRESS_EVERY_PARTS or time.perf_counter() - self.last >= PROGRESS_EVERY_S
        if self.ready and (force or due):
            _, seconds = _timed(self.commit, self.ready)
            self.times.commit_s += seconds
            self.times.progress_writes += 1
            self.ready, self.last = [], time.perf_counter()


class Pipeline:
    """One run of the pipeline over `paths` (see the module docstring)."""

    def __init__(self, engine: Engine, read: ReadShard, write: WritePart, commit: CommitParts,
                 readers: int = 0, writers: int = 0):
        default_readers, default_writers = default_threads()
        self.engine, self.read, self.write = engine, read, write
        self.times = StageTimes(readers=readers or default_readers, writers=writers or default_writers)
        self.progress = BatchedCommits(commit, self.times)
        self.writes: deque[tuple[str, Future[tuple[int, float, float]]]] = deque()

    def _read_task(self, path: Path) -> tuple[np.ndarray, Any, float]:
        started = time.perf_counter()
        ids, vectors = self.read(path)
        return ids, self.engine.prepare(vectors), time.perf_counter() - started

    def _write_task(self, name: str, ids: np.ndarray, wait: Waiter) -> tuple[int, float, float]:
        out, waited = _timed(wait)
        _, seconds = _timed(self.write, name, ids, out[:len(ids)])
        return len(ids), waited, seconds

    def _collect(self, limit: int) -> None:
        """Record finished writes in order; block while more than `limit` are pending."""
        while self.writes and (self.writes[0][1].done() or len(self.writes) > limit):
            name, future = self.writes.popleft()
            (rows, waited, seconds), blocked = _timed(future.result)
            self.times.wait_write_s += blocked
            self.times.engine_wait_s += waited
            self.times.write_s += seconds
            self.progress.add(name, rows)

    def run(self, paths: list[Path]) -> StageTimes:
        t, cpu, main_cpu = self.times, os.times(), time.thread_time()
        with ThreadPoolExecutor(t.readers, "score-read") as readers, \
                ThreadPoolExecutor(t.writers, "score-write") as writers:
            try:
                for path, future in read_ahead(readers, self._read_task, paths, t.readers + 2):
                    (ids, staged, seconds), blocked = _timed(future.result)
                    t.read_s, t.wait_read_s = t.read_s + seconds, t.wait_read_s + blocked
                    wait, submitted = _timed(self.engine.submit, staged)
                    t.submit_s += submitted
                    self.writes.append((path.name, writers.submit(self._write_task, path.name, ids, wait)))
                    self._collect(limit=2 * t.writers)
                self._collect(limit=0)
            finally:  # also on an error: what is fully written is kept
                self.progress.flush(force=True)
        now = os.times()
        t.cpu_s = (now.user - cpu.user) + (now.system - cpu.system)
        t.main_cpu_s = time.thread_time() - main_cpu
        return t
