"""The tensor reader/encoder stage, picked for `--device cuda`: decode, resize and encode on the device.

Work is cut into units of one batch. Per unit, on three kinds of threads so
that none waits on another:

* reader threads (probe.py, route.py) read the bytes, hash them and probe the
  JPEG header, in the CPU worker processes when there are any. Plain 8-bit
  JPEGs (1 or 3 components, no EXIF rotation, sane size and aspect, complete)
  go to the device decoder; everything else (PNG, WebP, CMYK, rotated, URLs,
  unreadable files) goes to the CPU worker processes, which run the CPU path's
  reader (PIL with DCT-domain downscale) and give the same error rows. With
  `--gpu-cpu-share`, whole units also go to them while they have room.
* one decode thread (decode.py) runs the batched decoder (nvJPEG on CUDA,
  libjpeg on CPU) and, for small images, the batched resize (resize.py) on its
  own CUDA stream. A batch nvJPEG rejects goes to the CPU workers.
* the caller's thread (stage.py) joins the CPU part, normalises, runs the
  image tower (tower.py) on the default stream, copies the features to pinned
  memory without blocking, and hands the previous batch to the shard writer
  while the GPU works on this one.

Several devices (workers.py): one spawned worker process per device.
Options: `GpuOptions` (options.py), the `gpu` field of the run's IndexOptions.
Names are loaded on first use, so `gpu.options` imports alone (the CLI needs only it).
"""

import importlib
from typing import Any

_NAMES = {"warm_up": "decode", "GpuOptions": "options", "jpeg_size": "probe", "tensor_stage": "stage",
          "DeviceWorkers": "workers", "start_device_workers": "workers", "start_context": "context"}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
