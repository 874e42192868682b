"""Routing: each unit's items to the device decoder or to the CPU worker processes, and the stages' busy time."""

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from ..reader import Result, process_chunk
from ..sources import Item
from ..timeline import mark
from .probe import Packed, probe_row, read_chunk, read_local, read_probe

CPU_CHUNK = 16  # items per CPU-worker task, as on the CPU path
READ_CHUNK = 32  # items per read-hash-probe task of the worker processes


class Unit(NamedTuple):
    index: int  # type: ignore[assignment]
    items: list[Item]


class Done:
    """A finished result with a future's `.get()`."""

    def __init__(self, value: Any):
        self.value = value

    def get(self) -> Any:
        return self.value


@dataclass
class Stats:
    """Busy seconds per stage (threads overlap, so they add up to more than the wall time)."""

    read_s: float = 0.0
    decode_s: float = 0.0
    device_decode_call_s: float = 0.0  # of decode_s: the batched decode call (nvJPEG's host part), the rest resize
    wait_input_s: float = 0.0
    encode_s: float = 0.0
    wait_features_s: float = 0.0  # the encoder waiting for a batch's features: the tower's GPU time beyond the rest
    write_s: float = 0.0
    poll_s: float = 0.0  # the encoder asking whether the next unit or the unit in flight is ready
    encoder_s: float = 0.0  # the encoder's whole loop: its time beyond the five above is unaccounted (the
    # interpreter's: the GIL, the collector)
    encoder_cpu_s: float = 0.0  # the encoder thread's CPU time in that loop (the rest of it waited)
    gc_s: float = 0.0  # the cyclic garbage collector's pauses during the stage, every thread stopped
    gc_collections: int = 0
    gc_longest_s: float = 0.0
    device_images: int = 0
    cpu_images: int = 0
    rejected_batches: int = 0  # units the CPU workers decoded instead of the device
    hardware_stalls: int = 0  # nvJPEG hardware calls that never returned (the run went on without the engines)
    sm_decoder_calls: int = 0  # nvJPEG calls of the SM decoders (GPU_HYBRID, --gpu-sm-decoders)
    # the hardware decode calls' thread usage (nvjpeg.USAGE_FIELDS: wall and CPU s, minor faults, switches)
    nvjpeg_calls: dict[str, float] = field(default_factory=dict)
    lock: Any = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, value: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + value)

    def add_usage(self, name: str, value: float) -> None:
        with self.lock:
            self.nvjpeg_calls[name] = self.nvjpeg_calls.get(name, 0.0) + value

    def merge(self, values: dict[str, Any]) -> None:
        """Add another Stats' as_dict() (a device worker's) to this one."""
        for key, number in values.items():
            if isinstance(number, dict):  # nvjpeg_calls
                for name, value in number.items():
                    self.add_usage(name, value)
            elif key.endswith("_longest_s"):
                with self.lock:
                    setattr(self, key, max(getattr(self, key), number))
            else:
                self.add(key, number)

    def as_dict(self) -> dict[str, Any]:
        def rounded(value: Any) -> Any:
            return round(value, 3) if isinstance(value, float) else value
        values = {k: rounded(v) for k, v in vars(self).items() if k != "lock"}
        values["nvjpeg_calls"] = {k: rounded(v) for k, v in self.nvjpeg_calls.items()}
        return values


@contextmanager
def gc_pauses(stats: Stats) -> Iterator[None]:
    """The garbage collector's pauses while inside, summed into `stats` on the way out (the callback takes no
    lock: a collection may start while a thread holds the stats' one)."""
    pauses: list[float] = []
    began: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            pauses.append(time.perf_counter() - began.pop())

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)
        stats.merge({"gc_s": sum(pauses), "gc_collections": len(pauses), "gc_longest_s": max(pauses, default=0.0)})


SHARE_WAIT_S = 0.002  # the encoder waited this long for a unit's CPU part: the CPU workers are behind


class CpuShare:
    """How many images of each unit the CPU workers decode beside the device decoder, sized by what the encoder
    measures: after each unit whose CPU part was ready when the encoder reached it the share grows by one task
    (CPU_CHUNK images), after one it had to wait for it shrinks by a quarter; between 0 and `limit`. The CPU
    part then follows the workers' rate against the device's, whatever the images and the machine."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self.size = min(self.limit, CPU_CHUNK)
        self.lock = threading.Lock()

    def take(self, count: int) -> int:
        """Images of a unit of `count` for the CPU workers (never all of it: the device part leads)."""
        with self.lock:
            return min(self.size, count // 2)

    def joined(self, waited_s: float) -> None:
        """The encoder waited `waited_s` for a unit's CPU part."""
        with self.lock:
            if waited_s > SHARE_WAIT_S:
                self.size = int(self.size * 0.75) // CPU_CHUNK * CPU_CHUNK
            else:
                self.size = min(self.limit, self.size + CPU_CHUNK)


class Router:
    """Sends items to the CPU workers (their results' futures), and how many of each unit go there (`share`).

    `read`: the workers' read-hash-probe task (`read_chunk`); None reads in this process's threads.
    `first_on_cpu`: the first unit (index 0) goes to the CPU workers whole."""

    def __init__(self, pool: Any, work: Callable[[list[Item]], list[Result]], share: int, stats: Stats,
                 read: Callable[[list[Item]], Packed] | None = None, first_on_cpu: bool = False):
        self.pool, self.work, self.stats, self.read = pool, work, stats, read
        self.share = CpuShare(share if pool is not None else 0)
        self.first_on_cpu = first_on_cpu

    def submit(self, items: list[Item]) -> list[Any]:
        self.stats.add("cpu_images", len(items))
        chunks = [items[i:i + CPU_CHUNK] for i in range(0, len(items), CPU_CHUNK)]
        if self.pool is None:
            return [Done(self.work(chunk)) for chunk in chunks]
        return [self.pool.apply_async(self.work, (chunk,)) for chunk in chunks]

    def submit_reads(self, items: list[Item]) -> list[Any]:
        """Futures of `read` over chunks of items, run by the worker processes (inline without a pool)."""
        assert self.read is not None
        chunks = [items[i:i + READ_CHUNK] for i in range(0, len(items), READ_CHUNK)]
        if self.pool is None:
            return [Done(self.read(chunk)) for chunk in chunks]
        return [self.pool.apply_async(self.read, (chunk,)) for chunk in chunks]


@dataclass
class Prepared:
    unit: Unit
    rows: list[Result]  # to decode on the device; pixels stay None (they live on the device)
    data: list[Any]  # uint8 CPU tensors of their encoded bytes
    fallback: list[Any]  # futures of CPU-worker results
    hardware: list[bool] = field(default_factory=list)  # per row: nvJPEG's hardware engines take it
    joined: Callable[[float], None] | None = None  # told how long the encoder waited for the CPU part


@dataclass
class Decoded:
    """A unit after its device decode, as it goes to the encoder."""

    prepared: Prepared
    pixels: Any = None  # float (n, 3, R, R) 0..255 on the device for prepared.rows, or the decoded images
    event: Any = None  # recorded after the decode's (and resize's) work on its stream


def _read_in_workers(unit: Unit, router: Router) -> Prepared:
    import torch

    prepared, again = Prepared(unit, [], [], []), []
    for start, future in zip(range(0, len(unit.items), READ_CHUNK), router.submit_reads(unit.items)):
        packed = future.get()
        router.stats.add("cpu_images", len(packed.cpu))
        prepared.fallback.append(Done(packed.cpu))
        whole = torch.frombuffer(packed.data, dtype=torch.uint8) if packed.data else None
        for index, sha256, width, height, offset, length, hardware in packed.rows:
            item = unit.items[start + index]
            try:  # large files: a read here beats a pipe
                data = whole[offset:offset + length] if offset >= 0 and whole is not None else torch.frombuffer(
                    read_local(item), dtype=torch.uint8)
            except OSError:
                again.append(item)
                continue
            prepared.rows.append(Result(item, None, sha256, width, height))
            prepared.data.append(data)
            prepared.hardware.append(hardware)
    if again:
        prepared.fallback += router.submit(again)
    return prepared


def _read_in_threads(unit: Unit, router: Router, max_pixels: int) -> Prepared:
    import torch

    rows, data, cpu, hardware = [], [], [], []
    for item in unit.items:
        buf, dims = read_probe(item, max_pixels)
        if buf is None or dims is None:
            cpu.append(item)
            continue
        rows.append(probe_row(item, buf, dims))
        data.append(torch.frombuffer(buf, dtype=torch.uint8))
        hardware.append(dims[2])
    return Prepared(unit, rows, data, router.submit(cpu) if cpu else [], hardware)


def prepare(unit: Unit, router: Router, max_pixels: int) -> Prepared:
    """Reader thread: the unit's items read, hashed and probed (by the worker processes, or here) and routed
    to the device decoder or the CPU path; its last `router.share` items go to the CPU workers first (the
    whole first unit with `router.first_on_cpu`)."""
    if unit.index == 0 and router.first_on_cpu:  # nothing read here: the workers read and decode it
        return Prepared(unit, [], [], router.submit(unit.items))
    started = time.perf_counter()
    split = len(unit.items) - router.share.take(len(unit.items))
    cpu = router.submit(unit.items[split:]) if split < len(unit.items) else []
    device = Unit(unit.index, unit.items[:split])
    if router.read is not None:
        prepared = _read_in_workers(device, router)
    else:
        prepared = _read_in_threads(device, router, max_pixels)
    prepared.fallback += cpu
    prepared.joined = router.share.joined if cpu else None
    router.stats.add("read_s", time.perf_counter() - started)
    mark("first unit read", once=True)
    return prepared


def make_router(pool: Any, resolution: int, options: Any, stats: Stats, batch: int) -> Router:
    """With a pool, files are read, hashed and probed in the worker processes (keeping that Python work off
    this process's GIL: measured faster on an H100, docs/benchmarks.md); without one, in reader threads here.
    The CPU share: each unit's last images, sized by feedback (CpuShare) up to gpu.cpu_share (-1: half a unit;
    0, the default: none). On an H200 (round 7) whole units on the CPU workers cost thumbnails 20-30 % (their
    decode tasks queued the device units' reads), the split share 57 %: the nvJPEG calls took 2-4x as long per
    image while the workers' pixels arrived in this process. `gpu.first_unit` cpu: the first unit decodes on
    the workers (they are up before `import torch` ends; the device's decoders are made on the next unit)."""
    work = partial(process_chunk, size=resolution, max_pixels=options.max_pixels, timeout=options.timeout)
    read = partial(read_chunk, size=resolution, max_pixels=options.max_pixels,
                   timeout=options.timeout) if pool is not None else None
    share = options.gpu.cpu_share if options.gpu.cpu_share >= 0 else batch // 2
    return Router(pool, work, share, stats, read, options.gpu.first_unit == "cpu" and pool is not None)
