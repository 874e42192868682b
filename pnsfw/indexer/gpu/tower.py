"""The image tower the GPU path runs: CLIP's visual module at fp16, optionally compiled."""

from collections.abc import Callable
from typing import Any

from ..encoder import Encoder

COMPILE_MIN_ITEMS = 20_000_000  # torch.compile saved ~6% of the ViT's time (DESIGN §9): pays only past ~20M images


def reference_model(encoder: Encoder) -> Callable[[Any], Any]:
    """Normalised images -> features. On CUDA at fp16, a copy of the image tower with fp16 weights, as
    OpenAI's CLIP runs on GPUs (autocast would re-cast every weight each batch); else autocast."""
    import copy

    import torch

    if encoder.precision != "fp16" or not encoder.device.startswith("cuda"):
        def autocast(images: Any) -> Any:
            with encoder._autocast():
                return encoder.model.encode_image(images)
        return autocast
    from ..encoder import _clip_model

    visual = copy.deepcopy(encoder.model.visual)
    _clip_model().convert_weights(visual)  # fp16 convs/linears/attention; LayerNorm stays fp32, as in CLIP
    return lambda images: visual(images.to(torch.float16))


def _compiled(model: Callable[[Any], Any], batch: int) -> Callable[[Any], Any]:
    import torch

    compiled = torch.compile(model, dynamic=False)

    def fixed(images: Any) -> Any:  # one shape: the last, short batch is padded, not recompiled
        count = len(images)
        if count < batch:
            images = torch.cat([images, images.new_zeros((batch - count, *images.shape[1:]))])
        return compiled(images)[:count]

    return fixed


def image_model(encoder: Encoder, gpu: Any, items: int, batch: int) -> Callable[[Any], Any]:
    """The image tower (gpu.tower), compiled for jobs large enough to pay back the compile time (gpu.compile)."""
    wanted = gpu.compile
    auto = items >= COMPILE_MIN_ITEMS and encoder.device.startswith("cuda")
    model = reference_model(encoder)
    return _compiled(model, batch) if wanted == "on" or (wanted == "auto" and auto) else model
