"""`pnsfw score --ray`: shards as work units, scored by actors on Ray Data; the driver writes and commits.

Each actor opens the store itself (a local path or an object-store URL the cluster can reach), reads its
shard's vectors and runs the same engine a local run builds. The outputs come back in shard order and go
through the local run's part writer and progress commits, so the scores equal a local score.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..classifier.model import Classifier
from ..classifier.scoring import ScoreJob, ScoreSummary, score_store
from ..store import Store
from .cluster import RayCluster, connect

log = logging.getLogger("pnsfw.distributed")


@dataclass
class RayScorer:
    """A `scoring.Runner` on a Ray cluster."""

    cluster: RayCluster
    actors: int = 0
    name: str = "ray"

    def __call__(self, job: ScoreJob) -> dict[str, Any]:
        if not job.shards:
            return {}
        started, rows = time.perf_counter(), 0
        for name, ids, out in _outputs(self._dataset(job), job):
            job.write(name, ids, out)
            job.commit([(name, len(ids))])
            rows += len(ids)
        seconds = time.perf_counter() - started
        log.info("ray: %d shards, %d vectors, %.0f vectors/s", len(job.shards), rows, rows / max(seconds, 1e-9))
        return {"shards": len(job.shards), "rows": rows, "seconds": seconds}

    def _dataset(self, job: ScoreJob) -> Any:
        import ray.data

        engine, device, precision, batch_rows = job.engine
        gpu = self.cluster.gpus > 0 and device != "cpu"
        actors = self.cluster.actors(self.actors, device)
        # actors run in other folders (and on other nodes): a local store path must be absolute
        root = job.store.root if "://" in job.store.root else os.path.abspath(job.store.root)
        kwargs = {"root": root, "classifier": job.classifier,
                  "engine": (engine, "cuda" if gpu else "cpu", precision, batch_rows)}
        rows = [{"shard": shard.name} for shard in job.shards]
        return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _ShardScorer, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy", concurrency=actors,
            num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)


def _outputs(dataset: Any, job: ScoreJob) -> Any:
    """(shard name, ids, outputs) in shard order."""
    for row, shard in zip(dataset.iter_rows(), job.shards):
        if row["shard"] != shard.name:  # preserve_order is set by connect(); anything else is a bug
            raise RuntimeError(f"ray returned shard {row['shard']} where {shard.name} was expected")
        ids = np.frombuffer(row["ids"], np.int64)
        yield shard.name, ids, np.frombuffer(row["out"], np.float32).reshape(len(ids), -1)


class _ShardScorer:
    """An actor: the store opened and the engine built once; a shard name -> its ids and model outputs."""

    def __init__(self, root: str, classifier: Classifier, engine: tuple[str, str, str, int]):
        from ..classifier.engines import make_engine
        from ..classifier.scoring import shard_reader

        self.store = Store.open(root)
        self.engine = make_engine(classifier, *engine)
        self.read = shard_reader(self.store)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids_out, outs = [], []
        for name in batch["shard"]:
            ids, blocks = self.read(self.store.shard(str(name)))
            out = self.engine.submit(self.engine.prepare(blocks))()[:len(ids)]
            ids_out.append(np.ascontiguousarray(ids, np.int64).tobytes())
            outs.append(np.ascontiguousarray(out, np.float32).tobytes())
        return {"shard": batch["shard"], "ids": np.array(ids_out, dtype=object), "out": np.array(outs, dtype=object)}


def score_with_ray(store: str, name: str, address: str | None, actors: int = 0, **options: Any) -> ScoreSummary:
    """`score_store` with the shards scored on Ray (`options` as score_store takes them)."""
    return score_store(store, name, runner=RayScorer(connect(address), actors), **options)
