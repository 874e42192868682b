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
import os
import sys
from typing import Any

BACKEND_HARDWARE = 3  # nvjpegBackend_t NVJPEG_BACKEND_HARDWARE
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
            return lib
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    raise NvjpegError("no usable libnvjpeg (" + ("; ".join(errors) or "none found beside torch/torchvision") + ")")


def _check(status: int, call: str) -> None:
    if status != 0:
        raise NvjpegError(f"{call} failed: {_STATUS.get(status, f'status {status}')}")


class HardwareDecoder:
    """One nvJPEG handle and decode state on the HARDWARE backend, for one thread."""

    def __init__(self) -> None:
        self.lib = library()
        self.handle, self.state = ctypes.c_void_p(), ctypes.c_void_p()
        self.batch = 0
        _check(self.lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle)),
               "nvjpegCreateEx(HARDWARE)")
        try:
            _check(self.lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)), "nvjpegJpegStateCreate")
        except NvjpegError:
            self.close()
            raise

    def decode(self, data: list[Any], sizes: list[tuple[int, int]], device: Any) -> list[Any]:
        """(3, H, W) uint8 tensors on `device` (the current stream) of the JPEG bytes in `data` (uint8 CPU
        tensors; sizes: their (width, height) from the probe). NvjpegError if nvJPEG refuses the batch."""
        import torch

        count = len(data)
        if count != self.batch:  # the batched state is sized for one batch size
            _check(self.lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, count, 1, OUTPUT_RGB),
                   "nvjpegDecodeBatchedInitialize")
            self.batch = count
        outputs = [torch.empty((3, height, width), dtype=torch.uint8, device=device) for width, height in sizes]
        images = (Image * count)()
        for image, output, (width, _) in zip(images, outputs, sizes):
            for plane in range(3):
                image.channel[plane], image.pitch[plane] = output[plane].data_ptr(), width
        pointers = (ctypes.c_void_p * count)(*[tensor.data_ptr() for tensor in data])
        lengths = (ctypes.c_size_t * count)(*[tensor.numel() for tensor in data])
        stream = torch.cuda.current_stream(device).cuda_stream
        _check(self.lib.nvjpegDecodeBatched(self.handle, self.state, pointers, lengths, images, stream),
               "nvjpegDecodeBatched")
        return outputs

    def close(self) -> None:
        if self.state:
            self.lib.nvjpegJpegStateDestroy(self.state)
            self.state = ctypes.c_void_p()
        if self.handle:
            self.lib.nvjpegDestroy(self.handle)
            self.handle = ctypes.c_void_p()
