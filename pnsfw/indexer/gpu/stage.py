"""The tensor reader/encoder stage on one device: reader threads -> decode thread -> (resize thread) -> encode."""

import itertools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import nullcontext
from functools import partial
from itertools import islice
from typing import Any, NamedTuple

import numpy as np

from ...concurrency import DaemonThreads
from ...errors import DeviceStalled
from ..encoder import Encoder
from ..reader import Result
from ..sources import Item
from ..timeline import mark
from .decode import Decoded, DecoderPool, decode_unit, padded_fits, to_cpu
from .profile import ProfileWindow
from .resize import device_pixels, put, resize_later, resize_thread
from .route import Prepared, Router, Stats, Unit, gc_pauses, make_router, prepare
from .tower import compiles, image_model

log = logging.getLogger(__name__)
READ_THREADS = 4  # hashing and reads release the GIL; more threads only contend for it
# every torch op releases the GIL; with Python's default 5 ms switch interval the decode thread then waits up
# to 5 ms per op behind the reader threads (seen on an H100: 3 s per batch of 1024)
GIL_SWITCH_S = 5e-5


class UnitResult(NamedTuple):
    index: int  # type: ignore[assignment]
    rows: list[Result]
    features: np.ndarray  # float32 (len(rows), width)
    errors: list[Result]


STALL_S = 120.0  # a hardware decode call running this long is taken as wedged (1024 2 MP photos take ~1 s)


def _ordered(executor: DaemonThreads, fn: Callable[[Any], Any], units: Iterable[Any],
             depth: int) -> Iterator[Any]:
    """fn over units on the executor, in order, at most `depth` ahead."""
    pending: deque = deque()
    for unit in units:
        pending.append(executor.submit(fn, unit))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _decode_on_stream(prepared: Prepared, decoders: DecoderPool, router: Router, encoder: Encoder,
                      mode: str) -> Decoded:
    import torch

    if decoders.wedged and prepared.rows:  # a hardware call never returned: keep off the engines
        return to_cpu(prepared, router)
    stream = decoders.stream()
    hardware = decoders.hardware_for(prepared)
    padded = padded_fits(prepared.rows)
    decoder = decoders.decoder(padded) if hardware else None
    gate = decoders.gate(padded, decoder) if decoder is not None else decoders.serial
    with torch.cuda.stream(stream) if stream is not None else nullcontext(), gate:
        later = resize_later(prepared.rows, mode)
        side = decoders.stream("side") if decoder is not None else None
        return decode_unit(prepared, encoder.device, encoder.resolution, router, later, decoder, side)


def _decode_thread(units: Iterable[Unit], router: Router, encoder: Encoder, options: Any,
                   out: queue.Queue, stop: threading.Event, decoders: DecoderPool) -> None:
    """Reader pool + decode threads (each its own stream and decoder); puts Decoded units in order, then None
    (or the exception that stopped it)."""
    count = decoders.threads
    try:
        with DaemonThreads(READ_THREADS, "pnsfw-read") as readers, DaemonThreads(count, "pnsfw-decode") as decode:
            read = partial(prepare, router=router, max_pixels=options.max_pixels)
            work = partial(_decode_on_stream, decoders=decoders, router=router, encoder=encoder,
                           mode=options.gpu.resize)
            for decoded in _ordered(decode, work, _ordered(readers, read, units, 2 * READ_THREADS), count + 1):
                if not put(out, decoded, stop):
                    return
        put(out, None, stop)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        put(out, exc, stop)
    finally:
        decoders.close(router.stats)


def _start_threads(units: Iterable[Unit], router: Router, encoder: Encoder, options: Any, out: queue.Queue,
                   stop: threading.Event, decoders: DecoderPool) -> list[threading.Thread]:
    middle: queue.Queue = queue.Queue(maxsize=4) if options.gpu.resize == "thread" else out
    threads = [threading.Thread(target=_decode_thread, daemon=True, name="pnsfw-decode",
                                args=(units, router, encoder, options, middle, stop, decoders))]
    if middle is not out:
        threads.append(threading.Thread(target=resize_thread, daemon=True, name="pnsfw-resize",
                                        args=(middle, out, stop, encoder.device, encoder.resolution)))
    for thread in threads:
        thread.start()
    return threads


def host_to_device(arrays: list[np.ndarray], device: str) -> Any:
    """(n, 3, R, R) uint8 on `device` of the CPU workers' (R, R, 3) pixels: stacked straight into page-locked
    memory (one copy, numpy's without the GIL), then copied without blocking."""
    import torch

    host = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=device.startswith("cuda"))
    np.stack(arrays, out=host.numpy())
    return host.to(device, non_blocking=True).permute(0, 3, 1, 2)


def _join(decoded: Decoded, device: str, size: int) -> tuple[list[Result], list[Result], Any]:
    """Rows, error rows and the (n, 3, R, R) 0..255 pixels of one unit, device part first."""
    import torch

    prepared = decoded.prepared
    rows, parts = list(prepared.rows), []
    errors: list[Result] = []
    cpu_rows: list[Result] = []
    if decoded.pixels is not None:
        parts.append(device_pixels(decoded, device, size))
    started = time.perf_counter()
    for future in prepared.fallback:
        for result in future.get():
            (errors if result.pixels is None else cpu_rows).append(result)
    if prepared.joined is not None:
        prepared.joined(time.perf_counter() - started)
    if cpu_rows:
        parts.append(host_to_device([r.pixels for r in cpu_rows], device))  # type: ignore[misc]
        rows += [r._replace(pixels=None) for r in cpu_rows]
    if len(parts) > 1:
        return rows, errors, torch.cat([p.float() for p in parts])
    return rows, errors, parts[0].float() if parts else None


class HostBuffers:
    """Page-locked buffers for the features' copies out, reused: a new one per unit cost one cudaHostAlloc
    (~8 ms each in an H200 pipeline profile, under the driver lock that the decode threads' ~4,000 CUDA calls
    per unit also take; session 10)."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.free: list[Any] = []

    def take(self, shape: tuple[int, ...]) -> Any:
        """A float32 buffer of at least prod(shape) values (a reused one when one is free)."""
        import torch

        count = int(np.prod(shape))
        for i, buffer in enumerate(self.free):
            if buffer.numel() >= count:
                return self.free.pop(i)
        return torch.empty(count, dtype=torch.float32, pin_memory=self.pinned)

    def give(self, buffer: Any) -> None:
        self.free.append(buffer)


class _Features:
    """Features copied to host memory without blocking; `.get()` waits for them and, on CUDA, hands back a copy
    (the page-locked buffer goes back to `buffers`)."""

    def __init__(self, features: Any, buffers: HostBuffers):
        import torch

        cuda = features.is_cuda
        self.buffers, self.buffer = buffers, buffers.take(tuple(features.shape))
        self.host = self.buffer[:features.numel()].view(features.shape)
        self.host.copy_(features, non_blocking=cuda)
        self.event = torch.cuda.Event() if cuda else None
        if self.event is not None:
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def get(self) -> np.ndarray:
        if self.event is None:  # off CUDA the buffer is a fresh one: handed out as it is, not reused
            return self.host.numpy()
        self.event.synchronize()
        features = self.host.numpy().copy()
        self.buffers.give(self.buffer)
        return features


def encode_stream(encoder: Encoder, options: Any) -> Any:
    """The CUDA stream the tower runs on, or None (the thread's current stream). nvJPEG's hardware calls wait
    for the legacy default stream's queued work (its internal streams are blocking), so by default the tower
    gets a stream of its own."""
    import torch

    if options.gpu.encode_stream != "own" or not encoder.device.startswith("cuda"):
        return None
    priority = TOWER_PRIORITIES.get(options.gpu.decode_priority, 0)
    if options.gpu.tower_sms:
        from .fallback import warn_once
        from .green import GreenUnavailable, green_stream

        try:
            stream, sms = green_stream(torch.device(encoder.device).index or 0, options.gpu.tower_sms, priority)
            log.info("the image tower runs on %d SMs (a green context)", sms)
            return stream
        except GreenUnavailable as exc:
            warn_once(f"no green context for the tower ({exc}); it runs on every SM")
    return torch.cuda.Stream(encoder.device, priority=priority)


TOWER_PRIORITIES = {"low": -1}  # --gpu-decode-priority low: the tower's stream at CUDA's highest priority


def _on(stream: Any) -> Any:
    import torch

    return torch.cuda.stream(stream) if stream is not None else nullcontext()


class _InFlight(NamedTuple):
    """A unit whose tower has been launched: its rows, error rows and features being copied out."""

    unit: Decoded
    rows: list[Result]
    errors: list[Result]
    features: _Features | None
    first: bool

    def done(self) -> bool:
        return self.features is None or self.features.ready()

    def result(self, encoder: Encoder, clock: "_Clock", window: ProfileWindow) -> UnitResult:
        """The unit's result, once its features are in host memory (the wait counted as wait_features_s)."""
        clock.start()
        vectors = self.features.get() if self.features else np.zeros((0, encoder.width), np.float32)
        clock.lap("wait_features_s")
        window.step(len(self.rows))
        return UnitResult(self.unit.prepared.unit.index, self.rows, vectors, self.errors)


class _Clock:
    """The encoder thread's busy seconds by part, added to the shared Stats once at the end: no lock taken
    per unit on the thread that feeds the tower."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = dict.fromkeys(ENCODER_PARTS, 0.0)
        self.began, self.cpu = time.perf_counter(), time.thread_time()
        self.last = self.began

    def start(self) -> None:
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        """The time since start() (or the last lap) counted as `part`."""
        now = time.perf_counter()
        self.spent[part] += now - self.last
        self.last = now

    def close(self, stats: Stats) -> None:
        for part, seconds in self.spent.items():
            stats.add(part, seconds)
        stats.add("encoder_s", time.perf_counter() - self.began)
        stats.add("encoder_cpu_s", time.thread_time() - self.cpu)


ENCODER_PARTS = ("poll_s", "wait_input_s", "encode_s", "wait_features_s", "write_s")


def _encode_one(unit: Decoded, encoder: Encoder, model: Callable[[Any], Any], stream: Any,
                buffers: HostBuffers, first: bool = False) -> _InFlight:
    """One decoded unit's tower launched on `stream`; its features being copied out."""
    import torch

    from ..tensor_preprocess import normalize

    with _on(stream):
        rows, errors, pixels = _join(unit, encoder.device, encoder.resolution)
        features = None
        if pixels is not None:
            with torch.inference_mode():
                features = _Features(model(normalize(pixels)), buffers)
    return _InFlight(unit, rows, errors, features, first)


def encode_units(decoded: Iterator[Decoded], encoder: Encoder, model: Callable[[Any], Any],
                 stats: Stats, stream: Any = None, window: ProfileWindow | None = None,
                 ready: Callable[[], bool] = lambda: True) -> Iterator[UnitResult]:
    """Encode each unit (on `stream`, None: the current one); a unit's features are fetched while the next one
    encodes. `ready`: whether the next unit can be had without waiting; when not, the unit in flight is handed
    out first if it is the first one or already done (the first batch then never waits for the second's
    decode: 2 MP photos' first unit waited 3.4 s on an H200, round 8). `window`: told of each unit done."""
    window = window or ProfileWindow(None)
    buffers = HostBuffers(encoder.device.startswith("cuda"))
    pending: _InFlight | None = None
    clock = _Clock()
    try:
        for count in itertools.count():
            clock.start()
            early = pending is not None and not ready() and (pending.first or pending.done())
            clock.lap("poll_s")
            if early and pending is not None:
                yield from _hand_over(pending.result(encoder, clock, window), clock)
                pending = None
            clock.start()
            unit = next(decoded, None)
            clock.lap("wait_input_s")
            current = _encode_one(unit, encoder, model, stream, buffers, count == 0) if unit is not None else None
            clock.lap("encode_s")
            if pending is not None:
                yield from _hand_over(pending.result(encoder, clock, window), clock)
            if current is None:
                return
            pending = current
    finally:
        clock.close(stats)
        window.close()


def _hand_over(result: UnitResult, clock: _Clock) -> Iterator[UnitResult]:
    """Yields `result`; the consumer's time with it (the writer's queue) counted as write_s."""
    clock.start()
    yield result
    clock.lap("write_s")


def _from_queue(out: queue.Queue, decoders: DecoderPool | None = None) -> Iterator[Decoded]:
    """The decode side's units until its None; raises what stopped it, or DeviceStalled once a hardware decode
    call has run STALL_S (seen on an H200: both decode threads waiting in nvjpegDecodeBatched for good)."""
    while True:
        try:
            value = out.get(timeout=1.0)
        except queue.Empty:
            stalled = decoders.stalled(STALL_S) if decoders is not None else 0.0
            if stalled:
                raise DeviceStalled(f"nvJPEG's hardware decode has not returned for {stalled:.0f} s (the JPEG "
                                    "engines are wedged); stopped with the committed rows kept: rerun to go on, "
                                    "with --gpu-decoder torchvision to keep off the engines") from None
            continue
        if value is None:
            return
        if isinstance(value, BaseException):
            raise value
        yield value


def _warm_up(model: Callable[[Any], Any], encoder: Encoder, batch: int, stream: Any = None) -> None:
    """One forward of the first unit's shape on zeros while the decode thread makes that unit: cuBLAS's
    handles and the kernels' lazy loading then cost the first batch nothing. The graph of the full batches is
    captured at the first of them, after the first batch is out."""
    import torch

    if encoder.device.startswith("cuda"):
        with _on(stream), torch.inference_mode():
            model(torch.zeros((batch, 3, encoder.resolution, encoder.resolution), device=encoder.device))


def device_stage(units: Iterable[Unit], encoder: Encoder, router: Router, options: Any, items: int,
                 batch: int) -> Iterator[UnitResult]:
    """Decode, resize and encode units on the encoder's device; results in unit order. The decode threads
    start beside the tower's warm-up, or after it when the tower is compiled: a compile of ~66 s beside
    them ended in a run at ~3 % GPU (an H200, session 10; suspected, not seen in its log: a hardware call
    held up past its 20 s watchdog, which sends the rest of the run to the CPU workers)."""
    out: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    previous = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)
    decoders = DecoderPool(encoder.device, options.gpu.decoder, options.gpu.decode_priority,
                           options.gpu.decode_threads, options.gpu.sm_decoders)
    start = partial(_start_threads, units, router, encoder, options, out, stop, decoders)
    deferred = compiles(encoder, options.gpu, items)
    threads = [] if deferred else start()
    try:
        model = image_model(encoder, options.gpu, items, batch)
        stream = encode_stream(encoder, options)
        _warm_up(model, encoder, min(batch, FIRST_UNIT), stream)
        mark("image tower ready")
        threads = start() if deferred else threads
        window = ProfileWindow(options.gpu.profile, encoder.device)
        with gc_pauses(router.stats):
            yield from encode_units(_from_queue(out, decoders), encoder, model, router.stats, stream, window,
                                    lambda: not out.empty())
    finally:
        sys.setswitchinterval(previous)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


FIRST_UNIT = 256  # the first unit's reads then do not queue behind whole units in the worker processes


def units(items: Iterable[Item], size: int, first: int = FIRST_UNIT) -> Iterator[Unit]:
    """Items cut into numbered units of `size`, the first of min(size, first): the first batch is encoded
    sooner (an H200 read the first of 1024 thumbnails in 1.4 s while seven more units were read beside it)."""
    iterator = iter(items)
    index, count = 0, min(size, first)
    while chunk := list(islice(iterator, count)):
        yield Unit(index, chunk)
        index, count = index + 1, size


def _stats_out(stats: Stats, path: str | None) -> None:
    if path:
        import json

        with open(path, "w") as f:
            json.dump(stats.as_dict(), f)


def tensor_stage(items: Iterable[Item], options: Any, encoder: Encoder, pool: Any,
                 on_error: Callable[[Result], None], batch: int) -> Iterator[tuple[list[Result], np.ndarray]]:
    """The pipeline's stage for `--device cuda` (or `reader="tensor"`): (rows, features) per batch. `pool`:
    the run's CPU worker pool, or the DeviceWorkers that the run started for several devices."""
    from .workers import DeviceWorkers

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
