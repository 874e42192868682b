"""A CUDA stream whose kernels run on a fixed share of the GPU's SMs: a green context (CUDA 12.4+ driver API).

Beside a tower that fills every SM, nvJPEG's hardware calls wait for the SMs their
own small kernels need: on an H200 a call of 1024 thumbnails took ~1 s beside the
looping tower against ~0.08 s alone (scripts/probe_nvjpeg_photos.py, session 9).
Running the tower in a green context of N SMs keeps the other SMs free for the
decode's and resize's kernels. Through ctypes on libcuda, as torch's own wrapper is
beta, changes between releases and needs the cuda-python bindings.
"""

import ctypes
import functools
from typing import Any

RESOURCE_SM = 1  # CUdevResourceType CU_DEV_RESOURCE_TYPE_SM
GREEN_CTX_DEFAULT_STREAM = 1  # CUgreenCtxCreate_flags
STREAM_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING
RESOURCE_BYTES = 1024  # CUdevResource is opaque past its type: room for any driver's layout
SM_COUNT_OFFSET = 96  # CUdevResource: type (4 bytes), 92 bytes of padding, then the union (sm.smCount first)


class GreenUnavailable(RuntimeError):
    """No green context here (driver too old, no GPU, a split refused); the message says why."""


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    from .context import libcuda

    try:
        lib = libcuda()
    except OSError as exc:
        raise GreenUnavailable(f"no CUDA driver ({exc})") from None
    for name in ("cuDeviceGet", "cuDeviceGetDevResource", "cuDevSmResourceSplitByCount", "cuDevResourceGenerateDesc",
                 "cuGreenCtxCreate", "cuGreenCtxStreamCreate"):
        if not hasattr(lib, name):
            raise GreenUnavailable(f"the CUDA driver has no {name} (green contexts need a 12.4+ driver)")
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _check(status: int, call: str) -> None:
    if status != 0:
        raise GreenUnavailable(f"{call} failed: CUresult {status}")


def sm_count(resource: ctypes.Array) -> int:
    return int.from_bytes(bytes(resource[SM_COUNT_OFFSET:SM_COUNT_OFFSET + 4]), "little")


def green_stream(device_index: int, sms: int, priority: int = 0) -> tuple[Any, int]:
    """(torch ExternalStream, SMs it got) of a new green context of at least `sms` SMs (the driver rounds up
    to its partition size) on device `device_index`; GreenUnavailable if none can be made. The context lives
    as long as the process (a run makes one)."""
    import torch

    lib = _driver()
    try:
        torch.cuda.init()  # the primary context first: the green context shares its memory
    except (RuntimeError, AssertionError) as exc:
        raise GreenUnavailable(f"no CUDA device ({str(exc).splitlines()[0]})") from None
    device = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
    whole = (ctypes.c_ubyte * RESOURCE_BYTES)()
    _check(lib.cuDeviceGetDevResource(device, whole, RESOURCE_SM), "cuDeviceGetDevResource")
    if not 0 < sms < sm_count(whole):
        raise GreenUnavailable(f"{sms} SMs asked, the device has {sm_count(whole)}")
    part, rest = (ctypes.c_ubyte * RESOURCE_BYTES)(), (ctypes.c_ubyte * RESOURCE_BYTES)()
    groups = ctypes.c_uint(1)
    _check(lib.cuDevSmResourceSplitByCount(part, ctypes.byref(groups), whole, rest, 0, sms),
           "cuDevSmResourceSplitByCount")
    if groups.value != 1:
        raise GreenUnavailable(f"the driver split {sms} SMs into {groups.value} groups")
    desc, context, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.cuDevResourceGenerateDesc(ctypes.byref(desc), part, 1), "cuDevResourceGenerateDesc")
    _check(lib.cuGreenCtxCreate(ctypes.byref(context), desc, device, GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
    _check(lib.cuGreenCtxStreamCreate(ctypes.byref(stream), context, STREAM_NON_BLOCKING, priority),
           "cuGreenCtxStreamCreate")
    _KEPT.append(context)
    return torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device_index)), sm_count(part)


_KEPT: list[Any] = []  # green contexts made by this process, never destroyed while their streams may run
