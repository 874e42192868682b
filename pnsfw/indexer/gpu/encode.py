"""The encoder thread: each decoded unit joined with its CPU part, its tower launched on the tower's stream, its
features copied out into reused page-locked buffers while the next unit encodes, and the thread's time by part."""

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np

from ..encoder import Encoder
from ..reader import Result
from .options import STREAM_PRIORITIES
from .profile import ProfileWindow
from .resize import device_pixels
from .route import Decoded, Stats

log = logging.getLogger(__name__)


class UnitResult(NamedTuple):
    index: int  # type: ignore[assignment]
    rows: list[Result]
    features: np.ndarray  # float32 (len(rows), width)
    errors: list[Result]


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
    priority = STREAM_PRIORITIES[options.gpu.decode_priority][1]
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


def on_stream(stream: Any) -> Any:
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

    with on_stream(stream):
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

