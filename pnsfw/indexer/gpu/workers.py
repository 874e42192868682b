"""The pipeline's stage for `--device cuda` (`tensor_stage`): in this process (stage.py), or, with several
devices on one host, one spawned worker process per device over disjoint units.

The parent puts the results back in unit order and is the only writer, so the
store's commit protocol and lock are unchanged. The workers are started by
`start_device_workers` as soon as a run finds work (before the parent has
imported torch), so their imports, model load and nvJPEG start-up overlap the
parent's. Devices are counted once, by `planned_workers`, without torch.
"""

import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import numpy as np

from ...concurrency import quiet_collector
from ..encoder import Encoder, load_encoder
from ..reader import Result
from ..sources import Item
from .context import configure_cuda
from .route import Stats, Unit, make_router
from .stage import UnitResult, device_stage, units


def device_worker(rank: int, device: str, model: str, options: Any, processes: int, batch: int,
                  jobs: Any, results: Any) -> None:
    """One process per device: pull units from `jobs`, put UnitResults (then ("done", stats)) on `results`."""
    pool = None
    try:
        pool = multiprocessing.get_context("fork").Pool(processes) if processes > 0 else None
        configure_cuda()
        encoder = load_encoder(model, device, options.precision)
        stats = Stats()
        router = make_router(pool, encoder.resolution, options, stats, batch)
        with quiet_collector():
            for result in device_stage(iter(jobs.get, None), encoder, router, options, 0, batch):
                results.put(result)
        results.put(("done", stats.as_dict()))
    except BaseException as exc:  # the parent re-raises it
        results.put(("error", f"worker {rank} on {device}: {type(exc).__name__}: {exc}"))
    finally:
        if pool is not None:
            pool.terminate()


def _feed(work: Iterator[Unit], jobs: Any, workers: int) -> None:
    for unit in work:
        jobs.put(unit)
    for _ in range(workers):
        jobs.put(None)


def _collect(results: Any, processes: list[Any], stats: Stats) -> Iterator[UnitResult]:
    """Worker results in unit order (a small reorder buffer); fails if a worker dies."""
    waiting: dict[int, UnitResult] = {}
    next_index, running = 0, len(processes)
    while running:
        try:
            value = results.get(timeout=5)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"GPU worker {dead[0].name} died with exit code {dead[0].exitcode}") from None
            continue
        if isinstance(value, tuple) and value[0] in ("done", "error"):
            if value[0] == "error":
                raise RuntimeError(value[1])
            running -= 1
            stats.merge(value[1])
            continue
        waiting[value.index] = value
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1


class DeviceWorkers:
    """One spawned worker process per device over disjoint units; this process stays the only writer.
    `terminate()` as for a process pool."""

    def __init__(self, model: str, options: Any, devices: list[str], batch: int):
        context = multiprocessing.get_context("spawn")
        count = len(devices)
        self.batch = batch
        self.jobs, self.results = context.Queue(maxsize=4 * count), context.Queue(maxsize=4 * count)
        processes_each = max(0, len(os.sched_getaffinity(0)) // count - 1)
        self.processes = [context.Process(target=device_worker, name=f"pnsfw-{device}",  # not daemonic: it has a pool
                                          args=(rank, device, model, options, processes_each, batch, self.jobs,
                                                self.results))
                          for rank, device in enumerate(devices)]
        for process in self.processes:
            process.start()

    def run(self, items: Iterable[Item], stats: Stats) -> Iterator[UnitResult]:
        feeder = threading.Thread(target=_feed, args=(units(items, self.batch), self.jobs, len(self.processes)),
                                  daemon=True)
        feeder.start()
        try:
            yield from _collect(self.results, self.processes, stats)
        finally:
            self.terminate()

    def terminate(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)


def planned_workers(options: Any) -> int:
    """Device workers a run will use, known without importing torch: --gpu-workers, else for cuda/auto one
    per GPU that CUDA_VISIBLE_DEVICES or the NVIDIA driver lists, else one."""
    if options.gpu.workers > 0:
        return int(options.gpu.workers)
    if options.device not in ("auto", "cuda"):
        return 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip()])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def start_device_workers(options: Any) -> DeviceWorkers | None:
    """The device workers of a multi-device run with the tensor reader, started now; None otherwise (then
    the run's one device is encoded in this process)."""
    if not wants_device_workers(options):
        return None
    count = planned_workers(options)
    devices = [f"cuda:{i}" for i in range(count)] if options.device in ("auto", "cuda") else [options.device] * count
    return DeviceWorkers(options.model, options, devices, options.batch_size or 1024)


def wants_device_workers(options: Any) -> bool:
    """Whether a run with `options` encodes in device workers (several devices, the tensor reader)."""
    gpu_like = options.device in ("auto", "cuda")
    return not (planned_workers(options) < 2 or options.reader == "pil" or (options.reader == "auto" and not gpu_like))


def _stats_out(stats: Stats, path: str | None) -> None:
    if path:
        import json

        with open(path, "w") as f:
            json.dump(stats.as_dict(), f)


def tensor_stage(items: Iterable[Item], options: Any, encoder: Encoder, pool: Any,
                 on_error: Callable[[Result], None], batch: int) -> Iterator[tuple[list[Result], np.ndarray]]:
    """The pipeline's stage for `--device cuda` (or `reader="tensor"`): (rows, features) per batch. `pool`:
    the run's CPU worker pool, or the DeviceWorkers that the run started for several devices."""
    stats = Stats()
    if isinstance(pool, DeviceWorkers):
        results = pool.run(items, stats)
    else:
        router = make_router(pool, encoder.resolution, options, stats, batch)
        count = len(items) if isinstance(items, Sized) else 0  # the runner's stream: size unknown, no auto compile
        results = device_stage(units(items, batch), encoder, router, options, count, batch)
    for result in results:
        for error in result.errors:
            on_error(error)
        if result.rows:
            yield result.rows, result.features
    _stats_out(stats, options.gpu.stage_stats)
