"""The tensor reader/encoder stage, picked for `--device cuda`: decode, resize and encode on the device.

Work is cut into units of one batch. Per unit, on three kinds of threads so
that none waits on another:

* reader threads read the bytes, hash them and probe the JPEG header. Plain
  8-bit JPEGs (1 or 3 components, no EXIF rotation, sane size and aspect,
  complete) go to the device decoder; everything else (PNG, WebP, CMYK,
  rotated, URLs, unreadable files) goes to the CPU worker processes, which run
  the CPU path's reader (PIL with DCT-domain downscale) and give the same error
  rows. While the CPU workers have room, whole units also go to them, so CPUs
  and GPU decode side by side.
* one decode thread runs the batched decoder (nvJPEG through
  `torchvision.io.decode_jpeg(list, device="cuda")`, libjpeg on CPU) and the
  batched resize (`tensor_preprocess.resize_crop`) on its own CUDA stream. A
  batch nvJPEG rejects goes to the CPU workers.
* the caller's thread joins the CPU part, normalises, encodes under autocast
  on the default stream, copies the features to pinned memory without
  blocking, and hands the previous batch to the shard writer while the GPU
  works on this one.

Several devices (`PNSFW_GPU_WORKERS`, default one per visible GPU for
`--device cuda`): one spawned worker process per device pulls units from a
shared queue; the parent puts the results back in unit order and is the only
writer, so the store's commit protocol and lock are unchanged. The workers are
spawned as soon as the run finds work, so they load beside the parent.
"""

import functools
import hashlib
import multiprocessing
import os
import queue
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, NamedTuple

import numpy as np

from .decode import MAX_ASPECT
from .encoder import Encoder, load_encoder
from .reader import Result, process_chunk
from .sources import TAR_SEPARATOR, Item
from .tensor_preprocess import normalize, resize_crop
from .timeline import mark

READ_THREADS = 4  # hashing and reads release the GIL; more threads only contend for it
GIL_SWITCH_S = 5e-5  # see device_stage
CPU_CHUNK = 16  # items per CPU-worker task, as on the CPU path
READ_CHUNK = 32  # items per read-hash-probe task of the worker processes
# Where the batched resize runs (PNSFW_GPU_RESIZE=auto|decoder|encoder|thread; thread: a thread of its own). auto: on the encoding thread for units
# of large images, whose nvJPEG decode already fills the decode thread (2 MP photos: 4,700 vs 3,700 img/s steady
# on an H100), on the decode thread for small ones (400 px thumbnails: 7,500 vs 5,500).
RESIZE = os.environ.get("PNSFW_GPU_RESIZE", "auto")
RESIZE_IN_ENCODER_FROM_PIXELS = 1_000_000  # mean pixels per image of a unit
INLINE_BYTES = 128 * 1024  # files up to this size come back through the pool's pipe; larger are read again here
MAX_DEVICE_PIXELS = 40_000_000  # larger images decode on CPU, where the DCT downscale shrinks them first
COMPILE_MIN_ITEMS = 20_000_000  # torch.compile saved ~6% of the ViT's time (DESIGN §9): pays only past ~20M images
_SOF = {0xC0, 0xC1, 0xC2}  # Huffman baseline / extended / progressive: what nvJPEG decodes
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class Unit(NamedTuple):
    index: int
    items: list[Item]


class UnitResult(NamedTuple):
    index: int
    rows: list[Result]
    features: np.ndarray  # float32 (len(rows), width)
    errors: list[Result]


# --------------------------------------------------------------- JPEG probe ---

def _exif_orientation(data: bytes, start: int, end: int) -> int:
    """Orientation tag (0x0112) of a TIFF block inside APP1, or 1."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(data[start:start + 2]))
    if order is None or start + 8 > end:
        return 1
    ifd = start + struct.unpack_from(order + "I", data, start + 4)[0]
    if ifd + 2 > end:
        return 1
    count = struct.unpack_from(order + "H", data, ifd)[0]
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, end - 11), 12):
        if struct.unpack_from(order + "H", data, entry)[0] == 0x0112:
            return struct.unpack_from(order + "H", data, entry + 8)[0]
    return 1


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder handles as the CPU path would, else None."""
    if data[:3] != b"\xff\xd8\xff" or data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0:
        return None  # not a JPEG, or truncated (the CPU path reports those)
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            if _exif_orientation(data, pos + 10, min(pos + 2 + length, end)) not in (0, 1):
                return None
        elif marker in _SOF and pos + 10 <= end:
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            plain = data[pos + 4] == 8 and data[pos + 9] in (1, 3)
            return (width, height) if plain and width and height else None
        elif marker in _OTHER_SOF or marker == 0xDA:
            return None
        pos += 2 + length
    return None


def _device_ok(size: tuple[int, int] | None, max_pixels: int) -> bool:
    if size is None:
        return False
    width, height = size
    return width * height <= min(max_pixels, MAX_DEVICE_PIXELS) and max(size) / min(size) <= MAX_ASPECT


def _read_local(item: Item) -> bytearray:
    """The bytes of a file or tar member, into a writable buffer (torch.frombuffer needs one)."""
    path = item.uri.split(TAR_SEPARATOR, 1)[0] if item.offset >= 0 else item.uri
    with open(path, "rb", buffering=0) as f:
        size = item.size if item.offset >= 0 else os.fstat(f.fileno()).st_size
        if item.offset >= 0:
            f.seek(item.offset)
        buf = bytearray(size)
        got = f.readinto(buf)
    return buf if got == size else buf[:got]


# ---------------------------------------------------------------- routing ---

class _Done:
    def __init__(self, value: list[Result]):
        self.value = value

    def get(self) -> list[Result]:
        return self.value


@dataclass
class Stats:
    """Busy seconds per stage (threads overlap, so they add up to more than the wall time)."""

    read_s: float = 0.0
    decode_s: float = 0.0
    device_decode_call_s: float = 0.0  # of decode_s: the batched decode call (nvJPEG's host part), the rest resize
    wait_input_s: float = 0.0
    encode_s: float = 0.0
    write_s: float = 0.0
    device_images: int = 0
    cpu_images: int = 0
    rejected_batches: int = 0
    lock: Any = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, value: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items() if k != "lock"}


class Router:
    """Sends items to the CPU workers (with their results' futures) and keeps count of what is in flight there.

    `read`: the workers' read-hash-probe task (`read_chunk`); None reads in this process's threads."""

    def __init__(self, pool: Any, work: Callable[[list[Item]], list[Result]], share: int, stats: Stats,
                 read: Callable[[list[Item]], "Packed"] | None = None):
        self.pool, self.work, self.share, self.stats, self.read = pool, work, share, stats, read
        self.in_flight = 0
        self.lock = threading.Lock()

    def _done(self, count: int, _: Any = None) -> None:
        with self.lock:
            self.in_flight -= count

    def submit(self, items: list[Item]) -> list[Any]:
        self.stats.add("cpu_images", len(items))
        chunks = [items[i:i + CPU_CHUNK] for i in range(0, len(items), CPU_CHUNK)]
        if self.pool is None:
            return [_Done(self.work(chunk)) for chunk in chunks]
        with self.lock:
            self.in_flight += len(items)
        return [self.pool.apply_async(self.work, (chunk,), callback=partial(self._done, len(chunk)),
                                      error_callback=partial(self._done, len(chunk))) for chunk in chunks]

    def submit_reads(self, items: list[Item]) -> list[Any]:
        """Futures of `read` over chunks of items, run by the worker processes (inline without a pool)."""
        chunks = [items[i:i + READ_CHUNK] for i in range(0, len(items), READ_CHUNK)]
        if self.pool is None:
            return [_Done(self.read(chunk)) for chunk in chunks]
        return [self.pool.apply_async(self.read, (chunk,)) for chunk in chunks]

    def take_whole(self, count: int) -> bool:
        """Whether a whole unit should decode on the CPU workers (they have room for it)."""
        with self.lock:
            return self.pool is not None and self.in_flight + count <= self.share


@dataclass
class Prepared:
    unit: Unit
    rows: list[Result]  # to decode on the device; pixels stay None (they live on the device)
    data: list[Any]  # uint8 CPU tensors of their encoded bytes
    fallback: list[Any]  # futures of CPU-worker results


class Packed(NamedTuple):
    """What a worker's `read_chunk` sends back: the device's JPEGs end to end in one buffer, the rest decoded."""

    data: bytearray
    rows: list[tuple[Result, int, int]]  # (row without pixels, offset in data or -1: read it again, length)
    cpu: list[Result]  # items the device decoder does not take, decoded (or failed) by the CPU path


def _read_probe(item: Item, max_pixels: int) -> tuple[bytearray | None, tuple[int, int] | None]:
    """The bytes of a local JPEG the device decodes, with its size; (None, None) for anything else."""
    if item.uri.startswith(("http://", "https://")):
        return None, None
    try:
        buf = _read_local(item)
    except OSError:
        return None, None  # the CPU path reads it again and reports why it failed
    size = jpeg_size(buf)
    return (buf, size) if _device_ok(size, max_pixels) else (None, None)


def read_chunk(items: list[Item], size: int, max_pixels: int, timeout: float) -> Packed:
    """Worker process: read, hash and probe each item; JPEGs for the device come back as bytes, the rest
    is decoded right here by the CPU path (one trip through the pool, and no Python per byte in the parent)."""
    data, rows, cpu = bytearray(), [], []
    for item in items:
        buf, dims = _read_probe(item, max_pixels)
        if buf is None or dims is None:
            cpu.append(item)
            continue
        inline = len(buf) <= INLINE_BYTES
        rows.append((Result(item, None, hashlib.sha256(buf).hexdigest(), dims[0], dims[1]),
                     len(data) if inline else -1, len(buf)))
        if inline:
            data += buf
    return Packed(data, rows, process_chunk(cpu, size, max_pixels, timeout))


def _read_in_workers(unit: Unit, router: Router) -> Prepared:
    import torch

    prepared, again = Prepared(unit, [], [], []), []
    for future in router.submit_reads(unit.items):
        packed = future.get()
        router.stats.add("cpu_images", len(packed.cpu))
        prepared.fallback.append(_Done(packed.cpu))
        whole = torch.frombuffer(packed.data, dtype=torch.uint8) if packed.data else None
        for row, offset, length in packed.rows:
            try:
                data = whole[offset:offset + length] if offset >= 0 else torch.frombuffer(
                    _read_local(row.item), dtype=torch.uint8)  # large files: a read here beats a pipe
            except OSError:
                again.append(row.item)
                continue
            prepared.rows.append(row)
            prepared.data.append(data)
    if again:
        prepared.fallback += router.submit(again)
    return prepared


def _read_in_threads(unit: Unit, router: Router, max_pixels: int) -> Prepared:
    import torch

    rows, data, cpu = [], [], []
    for item in unit.items:
        buf, dims = _read_probe(item, max_pixels)
        if buf is None or dims is None:
            cpu.append(item)
            continue
        rows.append(Result(item, None, hashlib.sha256(buf).hexdigest(), dims[0], dims[1]))
        data.append(torch.frombuffer(buf, dtype=torch.uint8))
    return Prepared(unit, rows, data, router.submit(cpu) if cpu else [])


def prepare(unit: Unit, router: Router, max_pixels: int) -> Prepared:
    """Reader thread: the unit's items read, hashed and probed (by the worker processes, or here) and routed
    to the device decoder or the CPU path; or the whole unit to the CPU workers while they have room."""
    started = time.perf_counter()
    if router.take_whole(len(unit.items)):
        return Prepared(unit, [], [], router.submit(unit.items))
    if router.read is not None:
        prepared = _read_in_workers(unit, router)
    else:
        prepared = _read_in_threads(unit, router, max_pixels)
    router.stats.add("read_s", time.perf_counter() - started)
    mark("first unit read", once=True)
    return prepared


# ----------------------------------------------------------------- decode ---

_RGB = 3  # torchvision.io.ImageReadMode.RGB.value


@functools.lru_cache(maxsize=1)
def _image_ops() -> Any:
    """torchvision's image extension (its JPEG ops) loaded on its own, or None. `import torchvision` runs
    torchvision.ops, which imports torch._dynamo: 5-6 s of start-up on the H100 machine (docs/benchmarks.md)."""
    import glob
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for library in sorted(glob.glob(os.path.join(folder, "image*.so"))):
            try:
                torch.ops.load_library(library)
                return torch.ops.image if hasattr(torch.ops.image, "decode_jpegs_cuda") else None
            except (OSError, RuntimeError, AttributeError):
                return None
    return None


def _decode_jpegs(data: list[Any], device: str) -> list[Any]:
    """uint8 (3, H, W) tensors on `device` from encoded JPEG bytes (nvJPEG on CUDA, libjpeg on CPU)."""
    import torch

    ops = _image_ops()
    if ops is None:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if device.startswith("cuda"):  # what torchvision.io.decode_jpeg calls, without its imports
        return ops.decode_jpegs_cuda(data, _RGB, torch.device(device))
    return [ops.decode_jpeg(image, _RGB, False) for image in data]


@dataclass
class Decoded:
    prepared: Prepared
    pixels: Any = None  # float (n, 3, R, R) 0..255 on the device for prepared.rows, or the decoded images
    event: Any = None


def decode_unit(prepared: Prepared, device: str, size: int, router: Router) -> Decoded:
    """Decode thread: batched decode + resize/crop; a batch the decoder rejects goes to the CPU workers."""
    import torch

    if not prepared.data:
        return Decoded(prepared)
    started = time.perf_counter()
    cuda = device.startswith("cuda")
    try:
        images = _decode_jpegs(prepared.data, device)
        router.stats.add("device_decode_call_s", time.perf_counter() - started)
    except RuntimeError:
        router.stats.add("rejected_batches", 1)
        prepared.fallback += router.submit([r.item for r in prepared.rows])
        prepared.rows, prepared.data = [], []
        return Decoded(prepared)
    pixels = images if _resize_in_encoder(prepared.rows) else resize_crop(images, size, _resize_dtype(device))
    event = torch.cuda.Event() if cuda else None
    if event is not None:
        event.record()
    router.stats.add("decode_s", time.perf_counter() - started)
    router.stats.add("device_images", len(prepared.rows))
    mark("first unit decoded on the device", once=True)
    return Decoded(prepared, pixels, event)


def _ordered(executor: ThreadPoolExecutor, fn: Callable[[Unit], Prepared], units: Iterable[Unit],
             depth: int) -> Iterator[Prepared]:
    """fn over units on the executor, in order, at most `depth` ahead."""
    pending: deque = deque()
    for unit in units:
        pending.append(executor.submit(fn, unit))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _put(out: queue.Queue, value: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(value, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _decode_thread(units: Iterable[Unit], router: Router, device: str, size: int, max_pixels: int,
                   out: queue.Queue, stop: threading.Event) -> None:
    """Reader pool + decoder; puts Decoded units in order, then None (or the exception that stopped it)."""
    import torch

    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    try:
        with ThreadPoolExecutor(READ_THREADS) as readers, torch.cuda.stream(stream) if stream else nullcontext():
            read = partial(prepare, router=router, max_pixels=max_pixels)
            for prepared in _ordered(readers, read, units, 2 * READ_THREADS):
                if not _put(out, decode_unit(prepared, device, size, router), stop):
                    return
        _put(out, None, stop)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        _put(out, exc, stop)


def _resize_thread(inbox: queue.Queue, out: queue.Queue, stop: threading.Event, device: str, size: int) -> None:
    """Between decode and encode (PNSFW_GPU_RESIZE=thread): resizes each unit on its own stream, so nvJPEG's
    host work, the resize's per-image ops and the encoder's launches run on three threads."""
    import torch

    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    try:
        with torch.cuda.stream(stream) if stream else nullcontext():
            while isinstance(value := inbox.get(), Decoded):
                if isinstance(value.pixels, list):
                    pixels = _device_pixels(value, device, size)
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record()
                    value = Decoded(value.prepared, pixels, event)
                if not _put(out, value, stop):
                    return
        _put(out, value, stop)  # None (the end) or the decode thread's exception
    except BaseException as exc:
        _put(out, exc, stop)


def _start_threads(units: Iterable[Unit], router: Router, encoder: Encoder, max_pixels: int, out: queue.Queue,
                   stop: threading.Event) -> list[threading.Thread]:
    device, size = encoder.device, encoder.resolution
    middle: queue.Queue = queue.Queue(maxsize=4) if RESIZE == "thread" else out
    threads = [threading.Thread(target=_decode_thread, daemon=True, name="pnsfw-decode",
                                args=(units, router, device, size, max_pixels, middle, stop))]
    if middle is not out:
        threads.append(threading.Thread(target=_resize_thread, daemon=True, name="pnsfw-resize",
                                        args=(middle, out, stop, device, size)))
    for thread in threads:
        thread.start()
    return threads


# ----------------------------------------------------------------- encode ---

def _resize_in_encoder(rows: list[Result]) -> bool:
    """Whether the decode thread leaves the resize to a later thread (the resize thread, or the encoder's)."""
    if RESIZE != "auto":
        return RESIZE in ("encoder", "thread")
    return sum(r.width * r.height for r in rows) >= RESIZE_IN_ENCODER_FROM_PIXELS * len(rows)


def _resize_dtype(device: str) -> Any:
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def _device_pixels(decoded: Decoded, device: str, size: int) -> Any:
    """The device part's (n, 3, R, R) pixels on this thread's stream (resized here when the decode thread
    left that to this one)."""
    import torch

    pixels = decoded.pixels
    tensors = pixels if isinstance(pixels, list) else [pixels]
    if decoded.event is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(decoded.event)
        for tensor in tensors:  # made on the decode thread's stream: not to be reused before this one is done
            tensor.record_stream(stream)
    return resize_crop(pixels, size, _resize_dtype(device)) if isinstance(pixels, list) else pixels


def _join(decoded: Decoded, device: str, size: int) -> tuple[list[Result], list[Result], Any]:
    """Rows, error rows and the (n, 3, R, R) 0..255 pixels of one unit, device part first."""
    import torch

    prepared = decoded.prepared
    rows, parts, errors, cpu_rows = list(prepared.rows), [], [], []
    if decoded.pixels is not None:
        parts.append(_device_pixels(decoded, device, size))
    for future in prepared.fallback:
        for result in future.get():
            (errors if result.pixels is None else cpu_rows).append(result)
    if cpu_rows:
        host = torch.from_numpy(np.stack([r.pixels for r in cpu_rows]))
        host = host.pin_memory() if device.startswith("cuda") else host
        parts.append(host.to(device, non_blocking=True).permute(0, 3, 1, 2))
        rows += [r._replace(pixels=None) for r in cpu_rows]
    return rows, errors, torch.cat([p.float() for p in parts]) if parts else None


class _Features:
    """Features copied to host memory without blocking; `.get()` waits for them."""

    def __init__(self, features: Any):
        import torch

        cuda = features.is_cuda
        self.host = torch.empty(features.shape, dtype=torch.float32, pin_memory=cuda)
        self.host.copy_(features, non_blocking=cuda)
        self.event = torch.cuda.Event() if cuda else None
        if self.event is not None:
            self.event.record()

    def get(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def _half_model(encoder: Encoder) -> Callable[[Any], Any]:
    """Normalised images -> features. On CUDA at fp16, a copy of the image tower with fp16 weights, as
    OpenAI's CLIP runs on GPUs (autocast would re-cast every weight each batch); else autocast."""
    import copy

    import torch

    if encoder.precision != "fp16" or not encoder.device.startswith("cuda"):
        def autocast(images: Any) -> Any:
            with encoder._autocast():
                return encoder.model.encode_image(images)
        return autocast
    from .encoder import _clip_model

    visual = copy.deepcopy(encoder.model.visual)
    _clip_model().convert_weights(visual)  # fp16 convs/linears/attention; LayerNorm stays fp32, as in CLIP
    return lambda images: visual(images.to(torch.float16))


def _image_model(encoder: Encoder, items: int, batch: int) -> Callable[[Any], Any]:
    """The image tower, compiled for jobs large enough to pay back the compile time (or PNSFW_COMPILE=1/0)."""
    import torch

    if os.environ.get("PNSFW_CUDNN_BENCHMARK") == "1":  # autotuned patch convolution (measured in docs)
        torch.backends.cudnn.benchmark = True
    wanted = os.environ.get("PNSFW_COMPILE")
    compile_it = wanted == "1" or (wanted is None and items >= COMPILE_MIN_ITEMS and encoder.device.startswith("cuda"))
    model = _half_model(encoder)
    if not compile_it:
        return model
    compiled = torch.compile(model, dynamic=False)

    def fixed(images: Any) -> Any:  # one shape: the last, short batch is padded, not recompiled
        count = len(images)
        if count < batch:
            images = torch.cat([images, images.new_zeros((batch - count, *images.shape[1:]))])
        return compiled(images)[:count]

    return fixed


def encode_units(decoded: Iterator[Decoded], encoder: Encoder, model: Callable[[Any], Any],
                 stats: Stats) -> Iterator[UnitResult]:
    """Encode each unit; a unit's features are fetched while the next one encodes."""
    import torch

    pending: tuple[Decoded, list[Result], list[Result], Any] | None = None
    while True:
        started = time.perf_counter()
        unit = next(decoded, None)
        stats.add("wait_input_s", time.perf_counter() - started)
        started = time.perf_counter()
        current = None
        if unit is not None:
            rows, errors, pixels = _join(unit, encoder.device, encoder.resolution)
            features = None
            if pixels is not None:
                with torch.inference_mode():
                    features = _Features(model(normalize(pixels)))
            current = (unit, rows, errors, features)
        stats.add("encode_s", time.perf_counter() - started)
        if pending is not None:
            done, rows_done, errors_done, features_done = pending
            vectors = features_done.get() if features_done else np.zeros((0, encoder.width), np.float32)
            started = time.perf_counter()
            yield UnitResult(done.prepared.unit.index, rows_done, vectors, errors_done)
            stats.add("write_s", time.perf_counter() - started)
        if current is None:
            return
        pending = current


def _from_queue(out: queue.Queue) -> Iterator[Decoded]:
    while (value := out.get()) is not None:
        if isinstance(value, BaseException):
            raise value
        yield value


def device_stage(units: Iterable[Unit], encoder: Encoder, router: Router, max_pixels: int, items: int,
                 batch: int) -> Iterator[UnitResult]:
    """Decode, resize and encode units on the encoder's device; results in unit order."""
    out: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    # every torch op releases the GIL; with Python's default 5 ms switch interval the decode thread then
    # waits up to 5 ms per op behind the reader threads (seen on an H100: 3 s per batch of 1024)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(float(os.environ.get("PNSFW_GIL_SWITCH_S", GIL_SWITCH_S)))
    threads = _start_threads(units, router, encoder, max_pixels, out, stop)
    try:
        model = _image_model(encoder, items, batch)
        mark("image tower ready")
        yield from encode_units(_from_queue(out), encoder, model, router.stats)
    finally:
        sys.setswitchinterval(previous)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


# -------------------------------------------------------- pipeline hookup ---

def warm_up(device: str) -> None:
    """Load torchvision's decoder and create nvJPEG's handle (seconds) while the model loads."""
    if not device.startswith("cuda"):
        return
    import io

    import torch
    from PIL import Image

    mark("torchvision's image ops " + ("loaded alone" if _image_ops() is not None else "imported"))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    _decode_jpegs([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
    mark("device decoder ready")


def _units(items: list[Item], size: int) -> Iterator[Unit]:
    iterator = iter(items)
    index = 0
    while chunk := list(islice(iterator, size)):
        yield Unit(index, chunk)
        index += 1


def _cpu_share(pool: Any) -> int:
    """Images the CPU workers may decode at once as whole units besides fallbacks (PNSFW_GPU_CPU_SHARE).
    Default 0: on an H100 with 16 cores a share of 64 per worker cost thumbnails 35% of their rate
    (the parent unpickles every decoded image) and gained 2 MP photos ~10% (docs/benchmarks.md)."""
    return int(os.environ.get("PNSFW_GPU_CPU_SHARE", 0)) if pool is not None else 0


def make_router(pool: Any, encoder: Encoder, options: Any, stats: Stats) -> Router:
    """PNSFW_GPU_READ=workers (default with a pool): files are read, hashed and probed in the worker
    processes, keeping that Python work off this process's GIL; threads: in reader threads here."""
    work = partial(process_chunk, size=encoder.resolution, max_pixels=options.max_pixels, timeout=options.timeout)
    in_workers = pool is not None and os.environ.get("PNSFW_GPU_READ", "workers") == "workers"
    read = partial(read_chunk, size=encoder.resolution, max_pixels=options.max_pixels,
                   timeout=options.timeout) if in_workers else None
    return Router(pool, work, _cpu_share(pool), stats, read)


def _worker_count(encoder: Encoder) -> int:
    import torch

    wanted = os.environ.get("PNSFW_GPU_WORKERS")
    if wanted:
        return int(wanted)
    return torch.cuda.device_count() if encoder.device == "cuda" else 1


def _stats_out(stats: Stats) -> None:
    path = os.environ.get("PNSFW_STAGE_STATS")
    if path:
        import json

        with open(path, "w") as f:
            json.dump(stats.as_dict(), f)


def tensor_stage(items: list[Item], options: Any, encoder: Encoder, pool: Any,
                 on_error: Callable[[Result], None], batch: int) -> Iterator[tuple[list[Result], np.ndarray]]:
    """The pipeline's stage for `--device cuda` (or `reader="tensor"`): (rows, features) per batch."""
    stats = Stats()
    count = _worker_count(encoder)
    if isinstance(pool, DeviceWorkers):  # started with the run
        results = pool.run(items, stats)
    elif count > 1:
        results = multi_device_stage(items, options, encoder, count, batch, stats)
    else:
        router = make_router(pool, encoder, options, stats)
        results = device_stage(_units(items, batch), encoder, router, options.max_pixels, len(items), batch)
    for result in results:
        for error in result.errors:
            on_error(error)
        if result.rows:
            yield result.rows, result.features
    _stats_out(stats)


# ------------------------------------------------------------ multi-device ---

def _device_names(encoder: Encoder, count: int) -> list[str]:
    if encoder.device == "cuda":
        return [f"cuda:{i}" for i in range(count)]
    return [encoder.device] * count


def device_worker(rank: int, device: str, model: str, options: Any, processes: int, batch: int,
                  jobs: Any, results: Any) -> None:
    """One process per device: pull units from `jobs`, put UnitResults (then ("done", stats)) on `results`."""
    try:
        pool = multiprocessing.get_context("fork").Pool(processes) if processes > 0 else None
        encoder = load_encoder(model, device, options.precision)
        stats = Stats()
        router = make_router(pool, encoder, options, stats)
        for result in device_stage(iter(jobs.get, None), encoder, router, options.max_pixels, 0, batch):
            results.put(result)
        results.put(("done", stats.as_dict()))
    except BaseException as exc:  # the parent re-raises it
        results.put(("error", f"worker {rank} on {device}: {type(exc).__name__}: {exc}"))
    finally:
        if "pool" in locals() and pool is not None:
            pool.terminate()


def _feed(units: Iterator[Unit], jobs: Any, workers: int) -> None:
    for unit in units:
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
            for key, number in value[1].items():
                stats.add(key, number)
            continue
        waiting[value.index] = value
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1


class DeviceWorkers:
    """One spawned worker process per device over disjoint units; this process stays the only writer.

    Started as soon as a run has work (before this process has imported torch), so the workers' own start-up
    (imports, model load, nvJPEG) overlaps the parent's. `terminate()` as for a process pool."""

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

    def run(self, items: list[Item], stats: Stats) -> Iterator[UnitResult]:
        feeder = threading.Thread(target=_feed, args=(_units(items, self.batch), self.jobs, len(self.processes)),
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


def planned_workers(device: str) -> int:
    """Device workers a run will use, known without importing torch: PNSFW_GPU_WORKERS, else for cuda/auto one
    per GPU that CUDA_VISIBLE_DEVICES or the NVIDIA driver lists."""
    wanted = os.environ.get("PNSFW_GPU_WORKERS")
    if wanted:
        return int(wanted)
    if device not in ("auto", "cuda"):
        return 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip()])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def start_device_workers(options: Any) -> DeviceWorkers | None:
    """The device workers of a multi-device run with the tensor reader, started now; None otherwise."""
    reader = options.reader if options.reader != "auto" else os.environ.get("PNSFW_READER", "auto")
    count = planned_workers(options.device)
    gpu_like = options.device in ("auto", "cuda")
    if count < 2 or reader == "pil" or (reader == "auto" and not gpu_like):
        return None
    devices = [f"cuda:{i}" for i in range(count)] if gpu_like else [options.device] * count
    return DeviceWorkers(options.model, options, devices, options.batch_size or 1024)


def multi_device_stage(items: list[Item], options: Any, encoder: Encoder, count: int, batch: int,
                       stats: Stats) -> Iterator[UnitResult]:
    """One spawned worker per device over disjoint units, started here."""
    return DeviceWorkers(encoder.name, options, _device_names(encoder, count), batch).run(items, stats)
