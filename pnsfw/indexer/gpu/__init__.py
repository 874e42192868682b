"""The tensor reader/encoder stage, picked for `--device cuda`: decode, resize and encode on the device.

Work is cut into units of one batch (the first one short). Per unit, on three kinds of threads that
stage.py starts and keeps in order, so that none waits on another:

* reader threads (probe.py, route.py) read the bytes, hash them and probe the
  JPEG header, in the CPU worker processes when there are any. Plain 8-bit
  JPEGs (1 or 3 components, no EXIF rotation, sane size and aspect, complete)
  go to the device decoder; everything else (PNG, WebP, CMYK, rotated, URLs,
  unreadable files) goes to the CPU worker processes, which run the CPU path's
  reader (PIL with DCT-domain downscale) and give the same error rows. With
  `--gpu-cpu-share`, a share of each unit also goes to them.
* decode threads (decode.py, nvjpeg.py; four by default), each with its own
  CUDA stream and nvJPEG handles: units of thumbnails decode into one padded
  batch on nvJPEG's GPU_HYBRID backend (the SMs), larger images on the
  hardware JPEG engines; small images are resized there in one batch
  (resize.py). What nvJPEG refuses goes to torchvision.io, else to the CPU
  workers; a hardware call that never returns sends the rest to them.
* the encoder, on the caller's thread (encode.py), joins the CPU part,
  normalises, runs the image tower (tower.py) on a stream of its own, copies
  the features out into reused page-locked memory without blocking, and hands
  the previous unit to the shard writer while the GPU works on this one.

Several devices (workers.py): one spawned worker process per device.
Options: `GpuOptions` (options.py), the `gpu` field of the run's IndexOptions.
Names are loaded on first use, so `gpu.options` imports alone (the CLI needs only it).
"""

import importlib
from typing import Any

_NAMES = {"warm_up": "decode", "GpuOptions": "options", "jpeg_size": "probe", "tensor_stage": "workers",
          "DeviceWorkers": "workers", "start_device_workers": "workers", "wants_device_workers": "workers",
          "start_context": "context", "premade_decoders": "decode", "discard_premade": "nvjpeg",
          "warm_ahead": "stage", "first_unit_size": "stage"}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
