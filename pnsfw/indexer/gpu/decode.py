"""Batched JPEG decode on the device (nvJPEG through torchvision's image ops; libjpeg on CPU)."""

import functools
import glob
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

from ..timeline import mark
from .resize import resize_dtype
from .route import Prepared, Router

_RGB = 3  # torchvision.io.ImageReadMode.RGB.value


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


@dataclass
class Decoded:
    prepared: Prepared
    pixels: Any = None  # float (n, 3, R, R) 0..255 on the device for prepared.rows, or the decoded images
    event: Any = None


def decode_unit(prepared: Prepared, device: str, size: int, router: Router, resize_later: bool) -> Decoded:
    """Decode thread: batched decode (+ resize/crop unless `resize_later`); a batch the decoder rejects goes
    to the CPU workers."""
    import torch

    from ..tensor_preprocess import resize_crop

    if not prepared.data:
        return Decoded(prepared)
    started = time.perf_counter()
    try:
        images = decode_jpegs(prepared.data, device)
        router.stats.add("device_decode_call_s", time.perf_counter() - started)
    except RuntimeError:
        router.stats.add("rejected_batches", 1)
        prepared.fallback += router.submit([r.item for r in prepared.rows])
        prepared.rows, prepared.data = [], []
        return Decoded(prepared)
    pixels = images if resize_later else resize_crop(images, size, resize_dtype(device))
    event = torch.cuda.Event() if device.startswith("cuda") else None
    if event is not None:
        event.record()
    router.stats.add("decode_s", time.perf_counter() - started)
    router.stats.add("device_images", len(prepared.rows))
    mark("first unit decoded on the device", once=True)
    return Decoded(prepared, pixels, event)


def warm_up(device: str) -> None:
    """Load torchvision's decoder and create nvJPEG's handle (seconds) while the model loads."""
    if not device.startswith("cuda"):
        return
    import io

    import torch
    from PIL import Image

    mark("torchvision's image ops " + ("loaded alone" if image_ops() is not None else "imported"))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    decode_jpegs([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
    mark("device decoder ready")
