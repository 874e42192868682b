"""The tensor reader/encoder stage on one device: reader threads -> decode threads -> (resize thread) -> the
encoder (encode.py), and the units they pass."""

import logging
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from functools import partial
from itertools import islice
from typing import Any

from ...concurrency import DaemonThreads
from ...errors import DeviceStalled
from ..encoder import Encoder
from ..sources import Item
from ..timeline import mark
from .decode import DecoderPool, decode_unit, padded_fits, to_cpu
from .encode import UnitResult, encode_stream, encode_units, on_stream
from .profile import ProfileWindow
from .resize import put, resize_later, resize_thread
from .route import Decoded, Prepared, Router, Unit, gc_pauses, prepare
from .tower import compiles, image_model, own_warm_up_begins
from .tower import warm_ahead as tower_warm_ahead

log = logging.getLogger(__name__)

READ_THREADS = 4  # hashing and reads release the GIL; more threads only contend for it
# every torch op releases the GIL; with Python's default 5 ms switch interval the decode thread then waits up
# to 5 ms per op behind the reader threads (seen on an H100: 3 s per batch of 1024)
GIL_SWITCH_S = 5e-5


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
    handles and the kernels' lazy loading then cost the first batch nothing; a graphed tower captures the first
    unit's graph here. The graph of the full batches is captured at the first of them, after the first batch
    is out."""
    import torch

    if encoder.device.startswith("cuda"):
        with on_stream(stream), torch.inference_mode():
            model(torch.zeros((batch, 3, encoder.resolution, encoder.resolution), device=encoder.device))


def warm_ahead(options: Any) -> Callable[[int], None] | None:
    """What the CUDA context's thread runs once torch is imported, for a run of IndexOptions `options` (None:
    nothing): the fast tower's warm-up on stand-in weights (tower.warm_ahead) at the first unit's batch, so
    that `_warm_up` then finds the kernels loaded."""
    dtypes = {"auto": "fp16", "fp16": "fp16", "bf16": "bf16"}
    if options.gpu.tower == "reference" or options.precision not in dtypes:
        return None
    batch = first_unit_size(options)

    def ahead(device: int) -> None:
        try:
            ran = tower_warm_ahead(device, batch, dtypes[options.precision])
            mark("image tower warmed ahead" if ran else "no tower warm-up ahead: the run's own had begun")
        except Exception as exc:  # an optimisation only: the run's own warm-up then loads the kernels
            log.debug("no tower warm-up ahead: %s", exc)

    return ahead


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
        own_warm_up_begins()
        first = min(batch, FIRST_UNIT)
        model = image_model(encoder, options.gpu, items, batch, first)
        stream = encode_stream(encoder, options)
        _warm_up(model, encoder, first, stream)  # the first unit's graph captured here
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


def first_unit_size(options: Any) -> int:
    """The first unit's images in a run of IndexOptions `options` on CUDA (its batch: 1024 by default)."""
    return min(options.batch_size or 1024, FIRST_UNIT)


def units(items: Iterable[Item], size: int, first: int = FIRST_UNIT) -> Iterator[Unit]:
    """Items cut into numbered units of `size`, the first of min(size, first): the first batch is encoded
    sooner (an H200 read the first of 1024 thumbnails in 1.4 s while seven more units were read beside it)."""
    iterator = iter(items)
    index, count = 0, min(size, first)
    while chunk := list(islice(iterator, count)):
        yield Unit(index, chunk)
        index, count = index + 1, size
