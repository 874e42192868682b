"""The CUDA context made while torch is still being imported.

`import torch` holds the start-up for ~3 s on an H200 machine, and the CUDA
context it then makes costs ~0.3 s more before the checkpoint can go to the GPU
(scripts/bench_gpu_startup.py). The driver's own calls need no torch: a thread
retains the device's primary context through libcuda (ctypes releases the GIL,
so the import goes on beside it), and torch later finds that context ready.
"""

import ctypes
import functools
import logging
import os
import re
import threading
from collections.abc import Callable

from ...devices import GPU_NODES
from ..timeline import mark

log = logging.getLogger(__name__)


# hardware work queues per context (CUDA's default 8): the tower's, the decode threads' and nvJPEG's own streams
# then do not share queues, whose false dependencies held nvJPEG's per-image syncs behind other streams' work
# (an H200, 100k thumbnails: the calls 8.8 s -> 5.2 s, steady 15.8k -> 17.8k img/s; session 9)
CONNECTIONS = "32"


def configure_cuda() -> None:
    """Settings CUDA reads when the context is made (a value the user set is kept)."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CONNECTIONS)


def device_index(device: str) -> int | None:
    """The CUDA device a run on `device` (auto, cuda, cuda:N) will use, or None when it will not use one:
    auto on a machine with no GPU device node."""
    if device == "auto":
        return 0 if any(map(os.path.exists, GPU_NODES)) else None
    matched = re.fullmatch(r"cuda(?::(\d+))?", device)
    return int(matched.group(1) or 0) if matched else None


@functools.lru_cache(maxsize=1)
def libcuda() -> ctypes.CDLL:
    """The CUDA driver's library (OSError where there is none)."""
    return ctypes.CDLL("libcuda.so.1")


def _retain(index: int, then: tuple[Callable[[int], None] | None, ...]) -> None:
    try:
        lib = libcuda()
        device, context = ctypes.c_int(), ctypes.c_void_p()
        for call, status in (("cuInit", lambda: lib.cuInit(0)),
                             ("cuDeviceGet", lambda: lib.cuDeviceGet(ctypes.byref(device), index)),
                             ("cuDevicePrimaryCtxRetain",
                              lambda: lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)),
                             ("cuCtxSetCurrent", lambda: lib.cuCtxSetCurrent(context))):
            if (code := status()) != 0:
                log.debug("no early CUDA context: %s returned %d (torch makes it later)", call, code)
                return
        mark("CUDA context made")
    except OSError as exc:
        log.debug("no early CUDA context (%s); torch makes it later", exc)
        return
    for step in then:
        if step is not None:
            step(index)


def start_context(device: str, *then: Callable[[int], None] | None) -> threading.Thread | None:
    """Start making the primary CUDA context of `device`'s GPU on a thread (None: no GPU to be used), then run
    each of `then` (None: skipped) with the device index on that thread, in turn, the context current. Call it
    after the worker processes are forked: a process that forks after cuInit cannot use CUDA in its children."""
    index = device_index(device)
    if index is None:
        return None
    configure_cuda()
    thread = threading.Thread(target=_retain, args=(index, then), name="pnsfw-cuda-context", daemon=True)
    thread.start()
    return thread
