"""`pnsfw index --ray`: the reader/encoder stage of a local run, executed on Ray Data.

The driver lists the sources as a local run does, cuts the new items into units in stream order, and
Ray Data runs CPU decode tasks over them; each task hands its pixels to one of the run's embedding actors
(object store to actor, not through the driver). The actors start with the run, so their model load overlaps
the driver's listing, and they live for the whole run (every window of the stream). Rows come back in unit
order and go through the local run's writer, so ids, rows and error rows equal a local run of the same
sources; a rerun after a crash skips what was committed, exactly like a local resume.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..indexer.encoder import Encoder, load_encoder
from ..indexer.pipeline import IndexOptions, IndexSummary, run_index, store_model
from ..indexer.reader import Result, process_chunk
from ..indexer.sources import Item
from .cluster import RETRIES, RayCluster, actor_options, connect, disconnect

log = logging.getLogger("pnsfw.distributed")
PROGRESS_EVERY_S = 10.0
DECODE_CPUS = 0.5
WINDOW_UNITS = 1024  # units per Ray dataset: bounds the driver's memory on endless sources
FAILED_UNIT = "worker_failed"  # reason of the rows of a unit that Ray could not finish after its retries


@dataclass(frozen=True)
class RayOptions:
    """`--ray [ADDRESS]` and `--actors N` of `pnsfw index`."""

    address: str | None = None  # None or "": a new local Ray
    actors: int = 0  # 0: one per GPU, else one per 2 CPUs
    unit_size: int = 0  # items per work unit; 0: the encoder's batch size


def index_with_ray(sources: list[str], store: str, options: IndexOptions, on_ray: RayOptions,
                   finish: Callable[[Any], dict[str, Any]] | None = None) -> IndexSummary:
    """Index SOURCEs into STORE with decode and embedding on Ray; the driver commits."""
    from ..store import Store

    cluster = connect(on_ray.address)
    model = store_model(Store(store), options.model)
    # the driver only lists, describes the encoder and commits: no decode workers, no GPU of its own
    driver = replace(options, model=model, workers=-1, device="cpu", precision="fp32")
    actors = _start_embedders(cluster, replace(options, model=model), on_ray)
    try:
        return run_index(sources, store, driver, finish=finish, stage=_RayStage(cluster, options, on_ray, actors))
    finally:
        _stop(actors)
        disconnect(cluster)  # explicit: the interpreter's exit hook takes ~0.9 s more (cluster.disconnect)


def _start_embedders(cluster: RayCluster, options: IndexOptions, on_ray: RayOptions) -> list[Any]:
    """The run's embedding actors, one GPU each on a GPU cluster; restarted by Ray if lost, their calls retried."""
    import ray

    assert options.model is not None
    gpu = cluster.uses_gpus(options.device)
    count = cluster.actors(on_ray.actors, options.device)
    # the actors run in other folders (and on other nodes): a checkpoint path must be absolute
    model = os.path.abspath(options.model) if os.path.isfile(options.model) else options.model
    actor = ray.remote(**actor_options(gpu))(_Embedder)
    return [actor.remote(model, "cuda" if gpu else "cpu", options.precision if gpu else "auto",
                         0 if gpu else max(1, cluster.cpus // count)) for _ in range(count)]


def _stop(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


@dataclass(frozen=True)
class _RayStage:
    """The reader/encoder stage of run_index on Ray: the actors load the weights, so the driver's encoder is
    only described (`needs_weights`): its seconds of model build are not spent before the actors start."""

    cluster: RayCluster
    options: IndexOptions
    on_ray: RayOptions
    actors: list[Any]
    needs_weights: bool = False

    def __call__(self, items: Iterable[Item], _options: IndexOptions, encoder: Encoder, _pool: Any,
                 on_error: Callable[[Result], None], batch: int) -> Iterator[tuple[list[Result], np.ndarray]]:
        for window in _windows(items, self.on_ray.unit_size or batch, WINDOW_UNITS):
            rows = _dataset(window, self.cluster, self.options, self.actors, encoder).iter_rows()
            yield from _ordered(rows, window, encoder.width, on_error)


def _windows(items: Iterable[Item], size: int, units: int) -> Iterator[list[list[Item]]]:
    """Units of `size` items, `units` at a time: the driver never holds more than one window of the stream."""
    iterator = iter(items)
    while window := [unit for unit in (list(itertools.islice(iterator, max(1, size))) for _ in range(units)) if unit]:
        yield window


def _dataset(units: list[list[Item]], cluster: RayCluster, options: IndexOptions, actors: list[Any],
             encoder: Encoder) -> Any:
    import ray.data

    rows = [{"unit": number, "items": pickle.dumps(unit)} for number, unit in enumerate(units)]
    work = functools.partial(_embed_unit, size=encoder.resolution, width=encoder.width, actors=actors,
                             max_pixels=options.max_pixels, timeout=options.timeout,
                             max_download=options.max_download)
    # a task waiting on its actor gives its CPU back to Ray: the cap bounds the decoded units held in memory
    in_flight = max(2, cluster.cpus, 2 * len(actors))
    return ray.data.from_items(rows, override_num_blocks=len(rows)).map(work, num_cpus=DECODE_CPUS,
                                                                         concurrency=in_flight)


def _embed_unit(row: dict[str, Any], size: int, width: int, actors: list[Any], max_pixels: int, timeout: float,
                max_download: int) -> dict[str, Any]:
    """A CPU task: read and decode a unit's items (failures stay rows with reasons), then its actor embeds."""
    import ray

    results = process_chunk(pickle.loads(row["items"]), size, max_pixels, timeout, max_download)
    good = [r.pixels for r in results if r.pixels is not None]
    features = np.zeros((0, width), np.float32)
    if good:
        try:
            features = ray.get(actors[int(row["unit"]) % len(actors)].embed.remote(np.stack(good)))
        except ray.exceptions.RayActorError as exc:  # the unit keeps killing its actor: error rows, no hang
            detail = f"its embedding actor died {RETRIES + 1} times: {str(exc).strip().splitlines()[0][:160]}"
            results = [r if r.pixels is None else Result(r.item, None, stage="embed", reason=FAILED_UNIT,
                                                         detail=detail) for r in results]
    meta = [r._replace(pixels=None) for r in results]
    return {"unit": row["unit"], "results": pickle.dumps(meta), "features": features.tobytes()}


class _Embedder:
    """An embedding actor: the CLIP encoder loaded once for the run, a unit's pixels -> raw features."""

    def __init__(self, model: str, device: str, precision: str, threads: int):
        if threads:  # Ray pins a 1-CPU actor to one thread; a CPU encoder uses its share of the node, as locally
            import torch

            torch.set_num_threads(threads)
        self.encoder = load_encoder(model, device, precision)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.encoder.encode_pixels(pixels), np.float32)


def _ordered(rows: Iterator[dict[str, Any]], units: list[list[Item]], width: int,
             on_error: Callable[[Result], None]) -> Iterator[tuple[list[Result], np.ndarray]]:
    """Rows in unit order; a unit that never came back becomes error rows."""
    expected, progress = 0, _Progress(len(units))
    for row in rows:
        number = int(row["unit"])
        for missing in range(expected, number):
            _fail_unit(units[missing], on_error)
        expected = number + 1
        results: list[Result] = pickle.loads(row["results"])
        for result in results:
            if result.reason:
                on_error(result)
        good = [r for r in results if not r.reason]
        features = np.frombuffer(row["features"], np.float32).reshape(len(good), width)
        progress.update(len(results))
        if good:
            yield good, features
    for missing in range(expected, len(units)):
        _fail_unit(units[missing], on_error)


def _fail_unit(unit: list[Item], on_error: Callable[[Result], None]) -> None:
    log.warning("a unit of %d items failed on every retry; its items become %s error rows", len(unit), FAILED_UNIT)
    for item in unit:
        on_error(Result(item, None, stage="ray", reason=FAILED_UNIT, detail="the unit failed on every retry"))


class _Progress:
    """Units done and images/s on the driver, logged every PROGRESS_EVERY_S."""

    def __init__(self, total: int):
        self.total, self.done, self.images = total, 0, 0
        self.started = self.last = time.monotonic()

    def update(self, images: int) -> None:
        self.done, self.images = self.done + 1, self.images + images
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.done == self.total:
            rate = self.images / max(now - self.started, 1e-9)
            log.info("ray: %d/%d units, %d images, %.1f img/s", self.done, self.total, self.images, rate)
            self.last = now
