"""Batched JPEG decode on the device: nvJPEG with our own handles (nvjpeg.py; thumbnails on its GPU_HYBRID
backend, the SMs, larger images on the hardware engines), else nvJPEG through torchvision's image ops (libjpeg on
CPU), else the CPU workers; each fallback logged once."""

import functools
import glob
import importlib.util
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from ..timeline import mark
from .fallback import warn_once
from .nvjpeg import BACKEND_GPU_HYBRID, BACKEND_HARDWARE
from .options import STREAM_PRIORITIES
from .resize import resize_dtype
from .route import Decoded, Prepared, Router

_RGB = 3  # torchvision.io.ImageReadMode.RGB.value
HARDWARE_THREADS = 2  # our binding on an H200: 2 MP photos 6,383 img/s steady with 2 (torchvision.io: 4,822)
# with the engines, units that decode into one padded batch (thumbnails) run on at most HARDWARE_THREADS at once
# (3 threads gave 16,832 img/s against 16,855 with 2 on 100k thumbnails); units of large images (photos) on up
# to LARGE_THREADS, one per LARGE_UNIT_GIB of the GPU's memory (an H200 on 10k photos: 4,923 img/s steady with
# 2, 5,921 with 3, 7,158 with 4, using 68, 89 and 93 GiB of its memory; session 9)
LARGE_THREADS = 4
SM_THREADS = 4  # thumbnails on nvJPEG's GPU_HYBRID backend (auto, sm): 94.3k img/s on four threads alone, 40.7k on
# one (an H200, ../shared/notes/gpu-ceilings.md); beside the tower 21.7k on one thread against the engines' 1.7k
# (round 11), as its kernels are not synchronised per image
LARGE_UNIT_GIB = 32
# Thumbnails (400 px) decode into one padded batch: on the engines 44k img/s on one thread, 56k on two
# (NVJPEG_FLAGS_ENABLE_MEMORY_POOLS), against 22-34k for torchvision.io's one decoder; units too large for the
# padded batch (photos) decode image by image (docs/benchmarks.md, round 3). auto: padded units on the SMs, the
# others on the engines (round 11: thumbnails 5-10 % faster end to end on the SMs, photos 6 % slower).
PADDED_MAX_BYTES = 1 << 30  # units whose (n, 3, Hmax, Wmax) uint8 batch fits decode into it, resized in one pass


@functools.lru_cache(maxsize=1)
def image_ops() -> Any:
    """torchvision's image extension (its JPEG ops) loaded on its own, or None. `import torchvision` runs
    torchvision.ops, which imports torch._dynamo: 5-6 s of start-up on the H100 machine (docs/benchmarks.md)."""
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


def decode_jpegs(data: list[Any], device: str) -> list[Any]:
    """uint8 (3, H, W) tensors on `device` from encoded JPEG bytes (nvJPEG on CUDA, libjpeg on CPU)."""
    import torch

    ops = image_ops()
    if ops is None:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if device.startswith("cuda"):  # what torchvision.io.decode_jpeg calls, without its imports
        return ops.decode_jpegs_cuda(data, _RGB, torch.device(device))
    return [ops.decode_jpeg(image, _RGB, False) for image in data]


def premade_decoders(gpu: Any, first_batch: int = 0) -> Callable[[int], None] | None:
    """What start_context makes beside torch's import for a run of GpuOptions `gpu` (None: nothing): the nvJPEG
    handles its decode threads take at their first units (auto, sm: one on the SMs per thread, for
    thumbnails; engines: the engines' threads'), the first with a state for the first unit's `first_batch`
    images. Larger images' handles (auto) are still made at first use."""
    plans = {"auto": (BACKEND_GPU_HYBRID, SM_THREADS), "sm": (BACKEND_GPU_HYBRID, SM_THREADS),
             "engines": (BACKEND_HARDWARE, HARDWARE_THREADS)}
    if gpu.decoder not in plans:
        return None
    backend, threads = plans[gpu.decoder]

    def premake_handles(device: int) -> None:
        from .nvjpeg import premake

        made = premake(device, backend, gpu.decode_threads or threads, first_batch=first_batch)
        mark(f"{made} nvJPEG handles made ahead")

    return premake_handles


def on_sms(decoder: Any) -> bool:
    """Whether `decoder` decodes on the SMs (GPU_HYBRID) rather than the JPEG engines."""
    return getattr(decoder, "backend", BACKEND_HARDWARE) != BACKEND_HARDWARE


class DecoderPool:
    """Per decode thread: its CUDA stream and its nvJPEG decoders, made on first use; one failure to make a
    decoder (no library, no GPU, no JPEG engine) is logged once and ends the tries. Mode "auto": a thread's
    padded units (thumbnails) on a GPU_HYBRID decoder (the SMs), its other units on the JPEG engines;
    "engines": every unit on the engines, and `sm_decoders` (an experiment) that many more threads whose decoder
    is a GPU_HYBRID one; "sm" (an experiment): every unit on GPU_HYBRID."""

    def __init__(self, device: str, mode: str, priority: str = "normal", threads: int = 0, sm_decoders: int = 0):
        self.device, self.mode, self.requested, self.sm = device, mode, threads, sm_decoders
        self.priority = STREAM_PRIORITIES[priority][0]
        self.local = threading.local()
        self.made: list[Any] = []
        self.planned: list[int] = []  # the backend of each decoder made or being made, in order
        self.lock = threading.Lock()
        self.unavailable = not device.startswith("cuda") or mode not in ("auto", "engines", "sm")
        self.serial = threading.Lock()  # torchvision.io's units, one at a time as with a single decode thread
        self.gates: dict[bool, threading.Semaphore] = {}  # padded or not: units decoding at once (auto threads)

    def hardware_for(self, prepared: Prepared) -> bool:
        """Whether this unit goes to our nvJPEG decoders (every unit, while they are there)."""
        return not self.unavailable and not self.wedged and bool(prepared.rows)

    @property
    def wedged(self) -> bool:
        """Whether a hardware call never returned: every later unit then decodes on the CPU workers
        (torchvision.io's decoder uses the same engines)."""
        with self.lock:
            return any(getattr(d, "wedged", False) for d in self.made)

    @property
    def threads(self) -> int:
        """Decode threads: as asked, else four with nvJPEG (auto, sm; large images on at most as many as the
        GPU's memory allows, `gate`); with the engines alone two for thumbnails (each feeds them while the other
        waits) and up to four for large images, plus the SM decoders' threads; one without nvJPEG."""
        if self.unavailable:
            return self.requested or 1
        if self.mode == "sm":
            return self.requested or SM_THREADS
        if self.mode == "auto":
            return self.requested or max(SM_THREADS, self._large_threads())
        return (self.requested or max(HARDWARE_THREADS, self._large_threads())) + self.sm

    def _large_threads(self) -> int:
        import torch

        total_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        return int(min(LARGE_THREADS, max(HARDWARE_THREADS, total_gib // LARGE_UNIT_GIB)))

    def gate(self, padded: bool, decoder: Any = None) -> Any:
        """What a unit holds while it decodes: with auto threads, at most HARDWARE_THREADS padded units (or
        the large-image count of the others) at once on the engines; with threads asked for, or on the SMs
        (one thread per SM decoder), nothing."""
        if self.requested or self.unavailable or on_sms(decoder):
            return nullcontext()
        with self.lock:
            if padded not in self.gates:
                self.gates[padded] = threading.Semaphore(HARDWARE_THREADS if padded else self._large_threads())
            return self.gates[padded]

    def stream(self, name: str = "stream") -> Any:
        """This thread's CUDA stream `name` (decode: "stream"; the padded resize: "side"), None off CUDA."""
        import torch

        if not self.device.startswith("cuda"):
            return None
        if getattr(self.local, name, None) is None:
            setattr(self.local, name, torch.cuda.Stream(self.device, priority=self.priority))
        return getattr(self.local, name)

    def decoder(self, padded: bool = False) -> Any:
        """This thread's HardwareDecoder for a unit that decodes into one padded batch or not (auto: one decoder
        for each), or None (torchvision.io decodes)."""
        if self.unavailable:
            return None
        if not hasattr(self.local, "decoders"):
            self.local.decoders = {}
        mine = self.local.decoders
        key = padded if self.mode == "auto" else None
        if key not in mine:
            import torch

            from .nvjpeg import HardwareDecoder, NvjpegError

            if ":" in self.device:  # nvJPEG's own runtime works on this thread's current device
                torch.cuda.set_device(self.device)
            try:
                mine[key] = self._make(HardwareDecoder, NvjpegError, padded)
                mark("nvJPEG decoder made", once=True)
            except NvjpegError as exc:
                self.unavailable = True
                warn_once(f"nvJPEG hardware decoder unavailable ({exc}); decoding through torchvision.io")
                return None
        return mine[key]

    def next_backend(self, padded: bool = False) -> int:
        """The backend of the next decoder to make: auto, the SMs' (GPU_HYBRID) for padded units, else the
        engines'; engines, theirs for the first threads, then the SMs' for the last `sm_decoders` of them (each
        thread makes one, on its first unit)."""
        if self.mode == "auto":
            return BACKEND_GPU_HYBRID if padded else BACKEND_HARDWARE
        with self.lock:
            engines = self.planned.count(BACKEND_HARDWARE)
            sms = self.mode == "sm" or (self.sm and engines >= self.threads - self.sm)
            backend = BACKEND_GPU_HYBRID if sms else BACKEND_HARDWARE
            self.planned.append(backend)
            return backend

    def _make(self, make: Any, error: type[Exception], padded: bool = False) -> Any:
        """A decoder of the next backend, listed in `made`; an SM decoder that cannot be made (also without
        nvJPEG's memory pools, a flag documented for the engines) is logged once and replaced by one on the
        engines."""
        backend = self.next_backend(padded)
        try:
            decoder = make(backend=backend)
        except error as exc:
            if backend == BACKEND_HARDWARE:
                raise
            try:
                decoder = make(backend=backend, flags=0)
            except error:
                warn_once(f"nvJPEG GPU_HYBRID decoder unavailable ({exc}); its thread uses the JPEG engines")
                decoder = make(backend=BACKEND_HARDWARE)
        with self.lock:
            self.made.append(decoder)
        return decoder

    def stalled(self, limit_s: float) -> float:
        """Seconds the longest hardware call in progress has run, if over `limit_s`; else 0."""
        now = time.monotonic()
        with self.lock:
            running = [now - d.since for d in self.made if d.since is not None and not getattr(d, "wedged", False)]
        longest = max(running, default=0.0)
        return longest if longest > limit_s else 0.0

    def close(self, stats: Any = None) -> None:
        """Close the decoders; their calls' summed thread usage (nvjpeg.USAGE_FIELDS) goes to `stats`."""
        with self.lock:
            for decoder in self.made:
                if stats is not None:
                    for name, value in decoder.usage.items():
                        stats.add_usage(name, value)
                    if on_sms(decoder):
                        stats.add("sm_decoder_calls", decoder.calls)
                decoder.close()
            self.made.clear()


def _hardware_first(prepared: Prepared, hardware: bool) -> int:
    """Reorders the rows so that those the hardware engines take come first; how many they are."""
    if not hardware or not prepared.hardware:
        return 0
    if all(prepared.hardware):  # the usual unit: nothing to move
        return len(prepared.hardware)
    order = sorted(range(len(prepared.rows)), key=lambda i: not prepared.hardware[i])
    prepared.rows = [prepared.rows[i] for i in order]
    prepared.data = [prepared.data[i] for i in order]
    prepared.hardware = [prepared.hardware[i] for i in order]
    return sum(prepared.hardware)


def device_decode(prepared: Prepared, device: str, decoder: Any) -> list[Any]:
    """(3, H, W) uint8 images of prepared.data, in its (possibly reordered) row order: the hardware engines'
    share through `decoder`, the rest (or all, when the engines refuse the batch) through torchvision.io."""
    from .nvjpeg import NvjpegError

    count = _hardware_first(prepared, decoder is not None)
    images: list[Any] = []
    if count:
        try:
            images = decoder.decode(prepared.data[:count], [(r.width, r.height) for r in prepared.rows[:count]],
                                    device)
        except NvjpegError as exc:
            warn_once(f"nvJPEG hardware decoder refused a batch ({exc}); torchvision.io decodes such batches")
            images = []
    rest = prepared.data[len(images):]
    return images + (decode_jpegs(rest, device) if rest else [])


def padded_fits(rows: list[Any]) -> bool:
    """Whether a unit's images fit one (n, 3, Hmax, Wmax) uint8 batch of at most PADDED_MAX_BYTES."""
    return bool(rows) and 3 * len(rows) * max(r.height for r in rows) * max(r.width for r in rows) <= \
        PADDED_MAX_BYTES


def padded_decode(prepared: Prepared, device: str, decoder: Any) -> tuple[Any, list[tuple[int, int]]]:
    """uint8 (n, 3, Hmax, Wmax) on `device` and each image's (H, W), in prepared's (reordered) row order: the
    hardware engines decode their share straight into the batch, torchvision.io the rest (copied in)."""
    import torch

    from .nvjpeg import NvjpegError

    count = _hardware_first(prepared, True)
    sizes = [(r.height, r.width) for r in prepared.rows[:count]]
    rest = decode_jpegs(prepared.data[count:], device) if count < len(prepared.data) else []
    shapes = sizes + [(int(i.shape[1]), int(i.shape[2])) for i in rest]
    out = torch.empty((len(shapes), 3, max(h for h, _ in shapes), max(w for _, w in shapes)), dtype=torch.uint8,
                      device=device)
    if count:  # first: nvJPEG's hardware writes do not wait for work queued on the stream (torchcodec#1634)
        try:
            decoder.decode_into(prepared.data[:count], out)
        except NvjpegError as exc:
            warn_once(f"nvJPEG hardware decoder refused a batch ({exc}); torchvision.io decodes such batches")
            rest = decode_jpegs(prepared.data, device)
            shapes = [(int(i.shape[1]), int(i.shape[2])) for i in rest]
            count = 0
    for i, image in enumerate(rest, count):
        out[i, :, :image.shape[1], :image.shape[2]] = image
    if rest and count:  # the next hardware call on this stream may be handed these copies' memory
        torch.cuda.current_stream(out.device).synchronize()
    return out, shapes


def _resize_beside(batch: Any, shapes: list[tuple[int, int]], size: int, side: Any) -> Any:
    """The padded batch resized on stream `side` (after the decode's stream): nvJPEG's batched call waits for
    its stream, which then holds decodes only."""
    import torch

    from ..tensor_preprocess import resize_padded

    if side is None:
        return resize_padded(batch, shapes, size, resize_dtype(str(batch.device)))
    side.wait_stream(torch.cuda.current_stream(batch.device))
    batch.record_stream(side)
    with torch.cuda.stream(side):
        return resize_padded(batch, shapes, size, resize_dtype(str(batch.device)))


def to_cpu(prepared: Prepared, router: Router, reason: str | None = None) -> Decoded:
    """The unit's device rows sent to the CPU workers instead (`reason` logged once)."""
    if reason:
        warn_once(reason)
    router.stats.add("rejected_batches", 1)
    prepared.fallback += router.submit([r.item for r in prepared.rows])
    prepared.rows, prepared.data, prepared.hardware = [], [], []
    return Decoded(prepared)


def decode_unit(prepared: Prepared, device: str, size: int, router: Router, resize_later: bool,
                decoder: Any = None, side: Any = None) -> Decoded:
    """Decode thread: batched decode (+ resize/crop unless `resize_later`) on this thread's stream (the padded
    batch's resize on `side`, when given); a batch no device decoder takes goes to the CPU workers."""
    import torch

    from ..tensor_preprocess import resize_crop
    from .nvjpeg import NvjpegStalled

    if not prepared.data:
        return Decoded(prepared)
    started = time.perf_counter()
    padded = decoder is not None and padded_fits(prepared.rows)
    try:
        images = padded_decode(prepared, device, decoder) if padded else device_decode(prepared, device, decoder)
        router.stats.add("device_decode_call_s", time.perf_counter() - started)
    except NvjpegStalled as exc:
        router.stats.add("hardware_stalls", 1)
        return to_cpu(prepared, router, f"{exc}: the JPEG engines are taken as wedged, the CPU workers decode "
                                        "this batch and every later one")
    except (RuntimeError, ImportError) as exc:
        return to_cpu(prepared, router, f"the device decoder refused a batch ({str(exc).splitlines()[0]}); the "
                                        "CPU workers decode such batches")
    if padded:
        pixels = _resize_beside(images[0], images[1], size, side)
    else:
        pixels = images if resize_later else resize_crop(images, size, resize_dtype(device))
    event = torch.cuda.Event() if device.startswith("cuda") else None
    if event is not None:
        event.record(side if padded and side is not None else torch.cuda.current_stream(device))
    router.stats.add("decode_s", time.perf_counter() - started)
    router.stats.add("device_images", len(prepared.rows))
    mark("first unit decoded on the device", once=True)
    return Decoded(prepared, pixels, event)


def warm_up(device: str) -> None:
    """Load nvJPEG and torchvision's image ops (dlopen) while the model loads. torchvision's one decoder, which
    takes only the files nvJPEG refuses, is made at its first such file: made here, its ~1 s (an H100, round 15)
    ran beside the tower's warm-up and the first unit's decode, and most runs never use it."""
    if not device.startswith("cuda"):
        return
    from .nvjpeg import NvjpegError, library

    try:
        # dlopen. The handles are made by the decode threads: two made here (states for the first units, one
        # tiny call each) took 1.8 s and held the tower's warm-up back by 1.6 s (an H200, session 10)
        library()
    except NvjpegError:
        pass  # the decode threads log it
    mark("torchvision's image ops " + ("loaded alone" if image_ops() is not None else "imported"))
