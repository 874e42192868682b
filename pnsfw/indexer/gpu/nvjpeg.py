"""nvJPEG's hardware JPEG engines through its batched C API, with handles of our own (ctypes).

torchvision decodes through ONE global nvJPEG decoder per process behind a
mutex (22k thumbnails/s on an H200); private handles with the HARDWARE backend,
one per decode thread, reached 58.7k/s with two threads
(../shared/notes/gpu-ceilings.md). The library is the libnvjpeg that the
torchvision (or nvidia-*) wheels ship, or the CUDA toolkit's. Nothing here
touches the GPU at import; `HardwareDecoder()` raises `NvjpegError` with the
reason when the library, a GPU or its JPEG engines are missing, and the caller
falls back (decode.py).

The hardware engines take baseline (SOF0/SOF1) 8-bit JPEGs; the probe sends
others (progressive, greyscale) to torchvision's decoder.
"""

import ctypes
import functools
import glob
import importlib.util
import logging
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..timeline import mark

BACKEND_HARDWARE = 3  # nvjpegBackend_t NVJPEG_BACKEND_HARDWARE: the JPEG engines
# NVJPEG_BACKEND_GPU_HYBRID: Huffman decode and IDCT on the SMs (batched calls of baseline, interleaved JPEGs);
# thumbnails alone 40.7k img/s on one thread, 94.3k on four, photos 1.9k (an H200, ../shared/notes/gpu-ceilings.md)
BACKEND_GPU_HYBRID = 2
BACKEND_NAMES = {BACKEND_HARDWARE: "HARDWARE", BACKEND_GPU_HYBRID: "GPU_HYBRID"}
FLAG_MEMORY_POOLS = 1 << 1  # NVJPEG_FLAGS_ENABLE_MEMORY_POOLS: internal allocations reused, not freed per call
CSS_444 = 0  # nvjpegChromaSubsampling_t NVJPEG_CSS_444: the largest buffers, for any subsampling
OUTPUT_YUV = 1  # nvjpegOutputFormat_t NVJPEG_OUTPUT_YUV: the planes as coded (chroma at its subsampling)
OUTPUT_RGB = 3  # nvjpegOutputFormat_t NVJPEG_OUTPUT_RGB: three planes, like torchvision's (3, H, W)
MAX_COMPONENT = 4
_STATUS = {1: "not initialized", 2: "invalid parameter", 3: "bad JPEG", 4: "JPEG not supported",
           5: "allocator failure", 6: "execution failed", 7: "architecture mismatch (no JPEG engine)",
           8: "internal error", 9: "implementation not supported", 10: "incomplete bitstream"}


class NvjpegError(RuntimeError):
    """nvJPEG's hardware path cannot be used (or one call failed); the message says why."""


class Image(ctypes.Structure):
    """nvjpegImage_t: a device pointer and a pitch per plane."""

    _fields_ = [("channel", ctypes.c_void_p * MAX_COMPONENT), ("pitch", ctypes.c_size_t * MAX_COMPONENT)]


def library_paths() -> list[str]:
    """Candidate libnvjpeg files: torchvision's wheel, the nvidia-* wheels, torch/lib, the CUDA toolkit."""
    folders = []
    for package in ("torchvision", "torch"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folders += [folder + ".libs", os.path.join(folder, "lib"), folder]
    for entry in sys.path:
        folders += glob.glob(os.path.join(entry, "nvidia", "*", "lib"))
    folders += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    found = [path for folder in folders for path in sorted(glob.glob(os.path.join(folder, "libnvjpeg*.so*")))]
    return [path for path in dict.fromkeys(found) if "stubs" not in path]


_SIGNATURES: dict[str, list[Any]] = {
    "nvjpegCreateEx": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)],
    "nvjpegJpegStateCreate": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)],
    "nvjpegDecodeBatchedInitialize": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int],
    "nvjpegDecodeBatched": [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                            ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(Image), ctypes.c_void_p],
    "nvjpegJpegStateDestroy": [ctypes.c_void_p],
    "nvjpegDestroy": [ctypes.c_void_p],
}
_OPTIONAL: dict[str, list[Any]] = {  # used when the library has them
    "nvjpegDecodeBatchedPreAllocate": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int],
}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The first libnvjpeg that loads and has the batched API, with its signatures set; NvjpegError if none."""
    errors = []
    for path in library_paths():
        try:
            lib = ctypes.CDLL(path)
            for name, argtypes in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes, function.restype = argtypes, ctypes.c_int
            for name, argtypes in _OPTIONAL.items():
                if hasattr(lib, name):
                    getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, ctypes.c_int
            return lib
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    raise NvjpegError("no usable libnvjpeg (" + ("; ".join(errors) or "none found beside torch/torchvision") + ")")


Key = tuple[int, int, int]  # (device, backend, flags)
PREMADE_WAIT_S = 3.0  # a decoder waits this long for a handle still being made ahead before it makes its own


@dataclass
class Made:
    """A handle made ahead, with the batched decode states made for it (by batch size; OUTPUT_RGB)."""

    handle: ctypes.c_void_p
    states: dict[int, ctypes.c_void_p] = field(default_factory=dict)


class Premade:
    """Handles made ahead, by (device, backend, flags), on the thread that makes the CUDA context while torch
    is still being imported; the decoders take them at their first units, oldest first. A decoder that comes
    while handles are still being made waits for the next one (at most PREMADE_WAIT_S) rather than making its
    own beside them: four decode threads made theirs at once at their first units in 0.4-0.8 s each (an H200,
    round 14), and with one of the handles held back for the first decode ahead, the first unit's thread made
    its own beside the others (0.3 s), then waited 1.1 s for its first call, and the first batch with it (an
    H100, round 15)."""

    def __init__(self) -> None:
        self.ready = threading.Condition()
        self.kept: dict[Key, list[Made]] = {}
        self.coming: dict[Key, int] = {}  # handles still being made (or lent out) for each key

    def expect(self, key: Key, count: int) -> None:
        """`count` more handles for `key` are being made (negative: that many will not come)."""
        with self.ready:
            self.coming[key] = self.coming.get(key, 0) + count
            self.ready.notify_all()

    def put(self, key: Key, made: Made, first: bool = False) -> None:
        """Keep `made` for `key`, the last to be taken (`first`: the next, as one lent and given back)."""
        with self.ready:
            kept = self.kept.setdefault(key, [])
            kept.insert(0 if first else len(kept), made)
            self.coming[key] = self.coming.get(key, 0) - 1
            self.ready.notify_all()

    def waiting(self) -> bool:
        """Whether any handle is kept or still coming (else nothing to ask torch's device for)."""
        with self.ready:
            return any(self.kept.values()) or any(n > 0 for n in self.coming.values())

    def take(self, key: Key, wait_s: float = PREMADE_WAIT_S) -> Made | None:
        """The oldest handle kept for `key`, waiting at most `wait_s` while more are coming; None if none."""
        deadline = time.monotonic() + wait_s
        with self.ready:
            while not self.kept.get(key):
                left = deadline - time.monotonic()
                if self.coming.get(key, 0) <= 0 or left <= 0:
                    return None
                self.ready.wait(left)
            return self.kept[key].pop(0)

    def lend(self, key: Key) -> Made | None:
        """The oldest handle kept for `key`, counted as still coming until it is `put` back; None if none is
        kept."""
        with self.ready:
            if not self.kept.get(key):
                return None
            self.coming[key] = self.coming.get(key, 0) + 1
            return self.kept[key].pop(0)

    def untaken(self, key: Key) -> int:
        with self.ready:
            return len(self.kept.get(key, ()))

    def clear(self) -> list[Made]:
        """Every handle kept, removed (nothing more is expected)."""
        with self.ready:
            left = [made for kept in self.kept.values() for made in kept]
            self.kept.clear()
            self.coming.clear()
            self.ready.notify_all()
        return left


_premade = Premade()


def batched_state(lib: ctypes.CDLL, handle: ctypes.c_void_p, count: int, output: int = OUTPUT_RGB) -> ctypes.c_void_p:
    """A decode state of `handle` initialised for batches of `count` (NvjpegError if nvJPEG refuses)."""
    state = ctypes.c_void_p()
    _check(lib.nvjpegJpegStateCreate(handle, ctypes.byref(state)), "nvjpegJpegStateCreate")
    try:
        _check(lib.nvjpegDecodeBatchedInitialize(handle, state, count, 1, output), "nvjpegDecodeBatchedInitialize")
    except NvjpegError:
        lib.nvjpegJpegStateDestroy(state)
        raise
    return state


def _made(lib: ctypes.CDLL, handle: ctypes.c_void_p, first_batch: int) -> Made:
    """`handle` with a state for the first unit's batch (its thread then makes none: a state took 0.1-0.6 s
    at the first unit, beside the others', an H100, round 15), if nvJPEG makes one."""
    try:
        return Made(handle, {first_batch: batched_state(lib, handle, first_batch)} if first_batch else {})
    except NvjpegError:
        return Made(handle)


def premake(device: int, backend: int, count: int, flags: int = FLAG_MEMORY_POOLS, first_batch: int = 0) -> int:
    """Make `count` handles for the GPU `device` on this thread (whose current CUDA context is that device's
    primary one), each kept for the decoders as soon as it is made, the first with a state for batches of
    `first_batch` (0: none); then, if no decoder has come yet, the first decode on one of them. How many were
    made. A failure ends the tries quietly: the decoders then make their own, and report what fails."""
    try:
        lib = library()
    except NvjpegError:
        return 0
    key = (device, backend, flags)
    _premade.expect(key, count)
    made = 0
    try:
        while made < count:
            handle = ctypes.c_void_p()
            if lib.nvjpegCreateEx(backend, None, None, flags, ctypes.byref(handle)) != 0:
                break
            _premade.put(key, _made(lib, handle, first_batch) if made == 0 else Made(handle))
            made += 1
    finally:
        _premade.expect(key, made - count)
    if made and _premade.untaken(key) == made:  # no decoder has come yet: nvJPEG's kernels load now
        _first_decode_ahead(lib, key)
    return made


def _first_decode_ahead(lib: ctypes.CDLL, key: Key) -> None:
    """first_decode on a handle lent out of the kept ones (a decoder that comes meanwhile takes another, or
    waits for this one)."""
    lent = _premade.lend(key)
    if lent is None:
        return
    try:
        if first_decode(lib, lent.handle):
            mark(f"nvJPEG's first decode ({BACKEND_NAMES.get(key[1], key[1])}) done ahead")
    finally:
        _premade.put(key, lent, first=True)


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (16, 16), (90, 120, 150)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def first_decode(lib: ctypes.CDLL, handle: ctypes.c_void_p, side: int = 16) -> bool:
    """One batched decode of a tiny JPEG on `handle` through the driver's own calls (no torch), on a thread
    whose current context is the device's: libnvjpeg loads its kernels and makes its lazy state now, beside
    torch's import, rather than in the first unit's decode (0.45-0.8 s a decode thread, an H100, round 15).
    Whether it decoded; a failure is only logged (the decoders then meet it and report it)."""
    from .context import libcuda

    state, out, cuda = ctypes.c_void_p(), ctypes.c_uint64(), None
    plane = side * side
    try:
        cuda, jpeg = libcuda(), _tiny_jpeg()
        _check(lib.nvjpegJpegStateCreate(handle, ctypes.byref(state)), "nvjpegJpegStateCreate")
        _check(lib.nvjpegDecodeBatchedInitialize(handle, state, 1, 1, OUTPUT_RGB), "nvjpegDecodeBatchedInitialize")
        if cuda.cuMemAlloc_v2(ctypes.byref(out), ctypes.c_size_t(3 * plane)) != 0:
            raise NvjpegError("cuMemAlloc failed")
        table = Image((ctypes.c_void_p * MAX_COMPONENT)(*(out.value + c * plane for c in range(3)), None),
                      (ctypes.c_size_t * MAX_COMPONENT)(side, side, side, 0))
        data = ctypes.create_string_buffer(jpeg, len(jpeg))
        pointers = (ctypes.c_void_p * 1)(ctypes.cast(data, ctypes.c_void_p).value)
        lengths = (ctypes.c_size_t * 1)(len(jpeg))
        _check(lib.nvjpegDecodeBatched(handle, state, pointers, lengths, ctypes.byref(table), None),
               "nvjpegDecodeBatched")
        if cuda.cuCtxSynchronize() != 0:
            raise NvjpegError("cuCtxSynchronize failed after the first decode")
        return True
    except (NvjpegError, OSError, AttributeError) as exc:  # AttributeError: a library without these calls
        logging.getLogger(__name__).debug("no first decode ahead: %s", exc)
        return False
    finally:
        if out.value and cuda is not None:
            cuda.cuMemFree_v2(out)
        if state.value:
            lib.nvjpegJpegStateDestroy(state)


def _take_premade(backend: int, flags: int, device: int | None = None) -> Made | None:
    """A handle made ahead for `device` (None: torch's current one), if one is kept or comes in time."""
    if not _premade.waiting():  # and then no need to ask torch for a device (there may be none)
        return None
    if device is None:
        import torch

        device = torch.cuda.current_device()
    return _premade.take((device, backend, flags))


def _destroy(lib: ctypes.CDLL, made: Made) -> None:
    for state in made.states.values():
        lib.nvjpegJpegStateDestroy(state)
    lib.nvjpegDestroy(made.handle)


def discard_premade() -> int:
    """Destroy the handles made ahead that no decoder took, and their states (at the end of a run); how many."""
    left = _premade.clear()
    for made in left:
        _destroy(library(), made)
    return len(left)


def page_locked(data: Any) -> Any:
    """A page-locked uint8 CPU tensor with the bytes of `data` (a bytearray or a uint8 CPU tensor), for the
    measurements (scripts/probe_nvjpeg_photos.py, bench_nvjpeg.py): in the pipeline, bytes read into page-locked
    memory ran no faster for thumbnails and slower for photos (an H200, round 10)."""
    import torch

    source = torch.frombuffer(data, dtype=torch.uint8) if isinstance(data, (bytes, bytearray)) else data
    return torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True).copy_(source)


def _check(status: int, call: str) -> None:
    if status != 0:
        raise NvjpegError(f"{call} failed: {_STATUS.get(status, f'status {status}')}")


# batched decode states per handle, one per batch size: the first unit, the steady one, the last. Two states per
# size used in turn (a call then waits for the call before the last) ran slower: the waits grew, 100k thumbnails
# 0.88x steady against one state, the median of four pairs on an H200 (round 10, call 2)
MAX_STATES = 3
CALL_TIMEOUT_S = 20.0  # a hardware call this long is taken as wedged (1024 2 MP photos take ~1 s in the pipeline)


def padded_table(out: Any, count: int) -> Any:
    """nvjpegImage_t rows (uint64: 4 plane pointers, 4 pitches) of the first `count` slots of `out`, a uint8
    (B, 3, Hmax, Wmax) CUDA tensor: each image top-left in its slot."""
    import numpy as np

    _, _, height, width = out.shape
    plane = height * width
    table = np.zeros((count, 8), np.uint64)
    first = out.data_ptr() + np.arange(count, dtype=np.uint64) * np.uint64(3 * plane)
    for c in range(3):
        table[:, c] = first + np.uint64(c * plane)
    table[:, 4:7] = width
    return table


USAGE_FIELDS = ("wall_s", "cpu_s", "minflt", "nvcsw", "nivcsw")
# where the rest of a call's time goes: on the caller thread before the C call (the state's previous call
# waited for, the bitstream arrays), and in the hand-over to and from the caller thread
TIMING_FIELDS = ("state_wait_s", "bitstreams_s", "round_trip_s")


def thread_usage() -> tuple[float, ...]:
    """This thread's (monotonic s, CPU s, minor faults, voluntary and involuntary context switches)."""
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return time.monotonic(), usage.ru_utime + usage.ru_stime, usage.ru_minflt, usage.ru_nvcsw, usage.ru_nivcsw


class NvjpegStalled(RuntimeError):
    """A hardware call did not return in time: the engines are taken as wedged for the rest of the process."""


class HardwareDecoder:
    """One nvJPEG handle on the HARDWARE backend (or `backend` GPU_HYBRID: on the SMs) with its batched decode
    states, for one thread.

    Calls follow the pattern NVIDIA's sample, torchvision and torchcodec use (round 5's pipeline hung in
    nvjpegDecodeBatched in 4 of 6 thumbnail runs while it re-initialised a state whose previous call could
    still be running; docs/benchmarks.md, rounds 5-6): a state is never re-initialised for another batch size
    (one state per size, at most MAX_STATES, the least recently used retired once its last call is done), and
    a state's previous call has finished (host wait on its event) before the state is used again. Every call
    runs on this decoder's own daemon thread and is waited for at most `timeout_s`: past that the decoder is
    `wedged`, keeps what the call may still read or write (never freed nor destroyed) and raises NvjpegStalled.

    `flags`: nvjpegCreateEx's flags; `preallocate`: (width, height) for nvjpegDecodeBatchedPreAllocate of each
    new state; `output`: nvjpegOutputFormat_t (planes of full size are handed over either way). The defaults
    are the measured winners on an H200 (thumbnails, one thread: pools 44k img/s, none 34k, pre-allocation
    35k; docs/benchmarks.md, round 3). The bitstreams are read where they are: page-locked ones (`page_locked`)
    are copied by DMA, pageable ones through the driver's staging."""

    def __init__(self, flags: int = FLAG_MEMORY_POOLS, preallocate: tuple[int, int] | None = None,
                 timeout_s: float = CALL_TIMEOUT_S, output: int = OUTPUT_RGB,
                 backend: int = BACKEND_HARDWARE) -> None:
        from collections import OrderedDict

        from ...concurrency import DaemonThreads

        self.lib = library()
        self.handle = ctypes.c_void_p()
        self.states: OrderedDict[int, list[Any]] = OrderedDict()  # batch size: [state, event of its last call]
        self.preallocate, self.timeout_s, self.output, self.backend = preallocate, timeout_s, output, backend
        self.calls = 0
        self.usage = dict.fromkeys(USAGE_FIELDS + TIMING_FIELDS, 0.0)  # summed over the calls
        self.since: float | None = None  # time.monotonic() when the call in progress began (a watchdog reads it)
        self.wedged = self.closed = False
        self.held: list[Any] = []  # what a wedged call may still read or write
        name = BACKEND_NAMES.get(backend, str(backend))
        premade = _take_premade(backend, flags)
        if premade is not None:
            self.handle = premade.handle
            self._adopt(premade.states)
        else:
            _check(self.lib.nvjpegCreateEx(backend, None, None, flags, ctypes.byref(self.handle)),
                   f"nvjpegCreateEx({name})")
        import torch

        self.caller = DaemonThreads(1, "pnsfw-nvjpeg")  # every call of this handle, on this device
        self.caller.submit(torch.cuda.set_device, torch.cuda.current_device()).result()

    def _adopt(self, states: dict[int, ctypes.c_void_p]) -> None:
        """The states made ahead with the handle: kept where this decoder would have made the same."""
        for count, state in states.items():
            if self.output == OUTPUT_RGB and self.preallocate is None and len(self.states) < MAX_STATES:
                self.states[count] = [state, None]
            else:
                self.lib.nvjpegJpegStateDestroy(state)

    def _new_state(self, count: int) -> Any:
        state = batched_state(self.lib, self.handle, count, self.output)
        if self.preallocate is not None and hasattr(self.lib, "nvjpegDecodeBatchedPreAllocate"):
            width, height = self.preallocate
            if self.lib.nvjpegDecodeBatchedPreAllocate(self.handle, state, count, width, height, CSS_444,
                                                       self.output) != 0:
                self.preallocate = None  # an optimisation only: decode without it
        return state

    def _state(self, count: int) -> list[Any]:
        """[state, event] for batches of `count`, its previous call finished."""
        if count not in self.states:
            if len(self.states) >= MAX_STATES:
                self._retire(*self.states.popitem(last=False)[1])
            self.states[count] = [self._new_state(count), None]
        self.states.move_to_end(count)
        entry = self.states[count]
        if entry[1] is not None:
            entry[1].synchronize()
        return entry

    def _retire(self, state: Any, event: Any) -> None:
        if event is not None:
            event.synchronize()
        self.lib.nvjpegJpegStateDestroy(state)

    @staticmethod
    def _bitstreams(data: list[Any]) -> tuple[Any, Any]:
        """(pointers, lengths) uint64 arrays of the batch's bytes, where they are."""
        import numpy as np

        lengths = np.fromiter((t.numel() for t in data), np.uint64, len(data))
        return np.fromiter((t.data_ptr() for t in data), np.uint64, len(data)), lengths

    def _decode_batched(self, data: list[Any], table: Any, stream: Any) -> int:
        """On the caller thread: the status of one nvjpegDecodeBatched into `table` on `stream`."""
        import torch

        started = time.perf_counter()
        entry = self._state(len(data))
        ready = time.perf_counter()
        pointers, lengths = self._bitstreams(data)
        self.usage["state_wait_s"] += ready - started
        self.usage["bitstreams_s"] += time.perf_counter() - ready
        # where a call's host time goes (CPU, page faults, waits) when it runs slower inside the pipeline
        before = thread_usage()
        status = self.lib.nvjpegDecodeBatched(self.handle, entry[0],
                                              pointers.ctypes.data_as(ctypes.POINTER(ctypes.c_void_p)),
                                              lengths.ctypes.data_as(ctypes.POINTER(ctypes.c_size_t)),
                                              table.ctypes.data_as(ctypes.POINTER(Image)), stream.cuda_stream)
        for name, start, end in zip(USAGE_FIELDS, before, thread_usage()):
            self.usage[name] += end - start
        entry[1] = torch.cuda.Event()
        entry[1].record(stream)
        return status

    def _call(self, data: list[Any], table: Any, device: Any, out: Any) -> None:
        """The batched decode on this thread's current stream, through the caller thread (its state's previous
        call waited for there too), at most `timeout_s`."""
        import torch

        if self.wedged:
            raise NvjpegStalled("an earlier nvjpegDecodeBatched call never returned")
        if self.closed:
            raise NvjpegError("the decoder is closed")
        stream = torch.cuda.current_stream(device)
        self.since = time.monotonic()
        future = self.caller.submit(lambda args: self._decode_batched(*args), (data, table, stream))
        try:
            status = future.result(timeout=self.timeout_s)
            self.usage["round_trip_s"] += time.monotonic() - self.since
        except TimeoutError:
            self.wedged = True
            self.held += [data, table, out, stream]
            raise NvjpegStalled(f"nvjpegDecodeBatched did not return in {self.timeout_s:.0f} s") from None
        finally:
            self.since = None
        _check(status, "nvjpegDecodeBatched")
        self.calls += 1

    def decode(self, data: list[Any], sizes: list[tuple[int, int]], device: Any) -> list[Any]:
        """(3, H, W) uint8 tensors on `device` (the current stream) of the JPEG bytes in `data` (uint8 CPU
        tensors; sizes: their (width, height) from the probe). NvjpegError if nvJPEG refuses the batch."""
        import numpy as np
        import torch

        outputs = [torch.empty((3, height, width), dtype=torch.uint8, device=device) for width, height in sizes]
        table = np.zeros((len(data), 8), np.uint64)  # nvjpegImage_t rows: 4 plane pointers, 4 pitches
        for row, output, (width, height) in zip(table, outputs, sizes):
            base = output.data_ptr()
            row[:3] = (base, base + width * height, base + 2 * width * height)
            row[4:7] = width
        self._call(data, table, device, outputs)
        return outputs

    def decode_into(self, data: list[Any], out: Any) -> None:
        """Decode into the first len(data) images of `out`, a uint8 (B, 3, Hmax, Wmax) CUDA tensor (each image
        top-left in its slot, the rest of the slot left as it was): one allocation and no per-image ops."""
        self._call(data, padded_table(out, len(data)), out.device, out)

    def _release(self) -> None:
        while self.states:
            self._retire(*self.states.popitem()[1])
        if self.handle:
            self.lib.nvjpegDestroy(self.handle)
            self.handle = ctypes.c_void_p()

    def close(self) -> None:
        """Retire the states and the handle on the caller thread, after any call still queued or running there
        (a run stopped early may close while a decode thread is mid-call); a wedged decoder is left as it is."""
        if self.wedged or self.closed:
            return
        self.closed = True
        try:
            self.caller.submit(lambda _: self._release(), None).result(timeout=self.timeout_s)
        except TimeoutError:
            return  # a call never returned: leave the handle to the process's end
        self.caller.__exit__()
