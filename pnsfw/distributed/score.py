"""`pnsfw score --ray`: shards as work units, read, scored and written by a pool of actors; the driver commits.

The actors start as soon as Ray is up, so their start-up overlaps the driver's own (opening the store, loading
the model, reading the score progress). Each opens the store itself (a local path or an object-store URL the
cluster can reach) and, for each shard it is given, reads the shard's vectors, runs the engine (built once per
model and kept) and writes the shard's score part with the local run's part writer. Only (rows, stage seconds)
travel back to the driver, which records the parts in shard order through the local run's batched progress
commits, so the scores equal a local score and a crash loses at most the parts not yet listed in progress.

The pool is plain Ray actors, not Ray Data (DESIGN §9 names Ray Data): a shard is one call with a name in and
a few numbers out, so Ray Data brings nothing here but its start-up (helper actors, planning, ~0.6 s to import),
which was the bulk of the Ray path's overhead on the 2-core benchmark machine (docs/benchmarks.md). Lost actors
are restarted and their calls retried by Ray (max_restarts / max_task_retries); a shard whose call loses its
actor RETRIES + 1 times ends the run with one line (the parts already listed are kept), never a hung job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PnsfwError, WorkerLost
from .cluster import RETRIES, RayCluster, actor_options, connect, disconnect

if TYPE_CHECKING:
    from ..classifier.model import Classifier
    from ..classifier.scoring import ScoreJob, ScoreSummary
    from ..store.records import Shard

log = logging.getLogger("pnsfw.distributed")
WORKER_STAGES = ("read_s", "score_s", "write_s")  # seconds each actor spends per shard, summed on the driver
CONCURRENT = 2  # shards an actor works on at once (threads): one reads or writes while the other is scored
IN_FLIGHT = 4  # shard calls queued per actor: the next shard is always waiting when one finishes


def score_with_ray(store: str, name: str, address: str | None, actors: int = 0, **options: Any) -> ScoreSummary:
    """`score_store` with the shards scored on Ray (`options` as score_store takes them)."""
    started = time.perf_counter()
    cluster = connect(address, data=False)
    try:
        scorer = RayScorer(cluster, _start_pool(cluster, store, actors, options.get("device", "cpu")),
                           time.perf_counter() - started)
        from ..classifier.scoring import score_store  # after the actors were asked for: they start meanwhile

        return score_store(store, name, runner=scorer, **options)
    finally:
        disconnect(cluster)


def _start_pool(cluster: RayCluster, store: str, wanted: int, device: str) -> list[Any]:
    """`--actors`, else one per GPU, else one per 2 CPUs (each works on CONCURRENT shards at once)."""
    import ray

    gpu = cluster.uses_gpus(device)
    # actors run in other folders (and on other nodes): a local store path must be absolute
    root = store if "://" in store else os.path.abspath(store)
    actor = ray.remote(**actor_options(gpu, max_concurrency=CONCURRENT))(_ShardScorer)
    return [actor.remote(root) for _ in range(cluster.actors(wanted, device))]


@dataclass
class RayScorer:
    """A `scoring.Runner` on a pool of actors; `connect_s`: the driver's ray.init and pool request."""

    cluster: RayCluster
    actors: list[Any]
    connect_s: float = 0.0
    name: str = "ray"
    stages: dict[str, float] = field(default_factory=dict)

    def __call__(self, job: ScoreJob) -> dict[str, Any]:
        from ..classifier.pipeline import BatchedCommits, StageTimes

        if not job.shards:
            return {}
        started, times = time.perf_counter(), StageTimes()
        commits, rows, first = BatchedCommits(job.commit, times), 0, 0.0
        self.stages = dict.fromkeys(WORKER_STAGES, 0.0)
        try:
            for name, count in self._written(job):
                first = first or time.perf_counter() - started
                commits.add(name, count)
                rows += count
        finally:  # also on an error: the parts already written and in order are kept
            commits.flush(force=True)
            if not self.cluster.owned:  # else they end with the driver's Ray session (disconnect)
                self._stop()
        seconds = time.perf_counter() - started
        log.info("ray: %d shards, %d vectors, %.0f vectors/s", len(job.shards), rows, rows / max(seconds, 1e-9))
        return {"shards": len(job.shards), "rows": rows, "seconds": round(seconds, 4),
                "connect_s": round(self.connect_s, 4), "first_part_s": round(first, 4), "actors": len(self.actors),
                "commit_s": round(times.commit_s, 4), "progress_writes": times.progress_writes,
                **{f"workers_{k}": round(v, 4) for k, v in self.stages.items()}}

    def _written(self, job: ScoreJob) -> Iterator[tuple[str, int]]:
        """(shard name, rows) of each part the actors wrote, in shard order; shards dealt round-robin."""
        import ray

        engine, device, precision, batch_rows = job.engine
        setup = (ray.put(job.classifier), (engine, "cuda" if self.cluster.uses_gpus(device) else "cpu",
                                           precision, batch_rows))
        pending: deque[tuple[str, Any]] = deque()
        for number, shard in enumerate(job.shards):
            pending.append((shard.name, self.actors[number % len(self.actors)].score.remote(shard, *setup)))
            while len(pending) >= IN_FLIGHT * len(self.actors) or (pending and number == len(job.shards) - 1):
                yield self._result(*pending.popleft())

    def _result(self, name: str, call: Any) -> tuple[str, int]:
        import ray

        try:
            result = ray.get(call)
        except ray.exceptions.RayTaskError as exc:  # a damaged shard: the local run's one line, not Ray's dump
            if isinstance(exc.cause, PnsfwError):
                raise exc.cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"shard {name}: its scoring actor died {RETRIES + 1} times "
                             f"({str(exc).strip().splitlines()[0][:160]}); the parts scored so far are kept, "
                             "rerun to go on") from None
        for key in WORKER_STAGES:
            self.stages[key] += result[key]
        return name, int(result["rows"])

    def _stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class _ShardScorer:
    """An actor: the store opened once; per model (fingerprint) an engine and a part writer, built on first use;
    a shard name -> its score part written, and its rows and stage seconds."""

    def __init__(self, root: str):
        import pyarrow.parquet  # noqa: F401  (imported while the driver starts, not on the first shard)

        from ..classifier import scoring
        from ..store import Store

        self.store, self.scoring = Store.open(root), scoring
        self.models: dict[str, tuple[Any, Any, Any]] = {}
        self.lock = threading.Lock()  # CONCURRENT calls run in threads

    def _model(self, classifier: Classifier, engine: tuple[str, str, str, int]) -> tuple[Any, Any, Any]:
        with self.lock:
            key = f"{classifier.name}:{classifier.fingerprint}:{engine}"
            if key not in self.models:
                self.store.follow(interval=0)  # opened before the driver's set-up (a migration, new shards)
                stash = self.scoring.UriStash(self.store)  # each shard's uris from its one read
                self.models[key] = (self.scoring.make_engine(classifier, *engine),
                                    self.scoring.shard_reader(self.store, stash),
                                    self.scoring.part_writer(self.store, classifier, stash))
            return self.models[key]

    def score(self, shard: Shard, classifier: Classifier, engine: tuple[str, str, str, int]) -> dict[str, float]:
        run, read, write = self._model(classifier, engine)
        t0 = time.perf_counter()
        ids, blocks = read(shard)
        t1 = time.perf_counter()
        out = run.submit(run.prepare(blocks))()[:len(ids)]
        t2 = time.perf_counter()
        write(shard.name, ids, out)
        return {"rows": len(ids), **dict(zip(WORKER_STAGES, (t1 - t0, t2 - t1, time.perf_counter() - t2)))}
