"""The CLIP encoder: load by name (download, cached) or by checkpoint path; encode pixels and text.

Resolution, embedding width and the weights fingerprint come from the loaded
model, never from constants.
"""

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, ModelNotFound
from ..store.files import sha256_file
from .decode import mean_std

DOWNLOAD_TIMEOUT_S = 30
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cache_dir() -> str:
    return os.environ.get("PNSFW_CLIP_CACHE", os.path.expanduser("~/.cache/clip"))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: str) -> str:
    """auto: fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16 (4x faster there), else fp32."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def _import_clip() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports the deprecated pkg_resources
        import clip
    return clip


def _fingerprint(model: str) -> str:
    if os.path.isfile(model):
        return sha256_file(Path(model))
    clip = _import_clip()

    return clip.clip._MODELS[model].split("/")[-2]  # OpenAI's URLs carry the sha256 of the file


def _load_clip(model: str) -> Any:
    clip = _import_clip()

    if not os.path.isfile(model) and model not in clip.available_models():
        raise ModelNotFound(f"unknown CLIP model {model!r}: not a file, and not one of {', '.join(clip.available_models())}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation, tried first on every file
            loaded, _ = clip.load(model, device="cpu", jit=False, download_root=cache_dir())
    except (OSError, RuntimeError) as exc:
        if os.path.isfile(model):
            raise ModelNotFound(f"cannot load CLIP checkpoint {model}: {str(exc).splitlines()[0]}") from None
        raise ModelNotFound(f"cannot download CLIP model {model!r} ({str(exc).splitlines()[0]}); offline? pass a "
                            f"checkpoint file: --model /path/to/checkpoint.pt (or set PNSFW_MODEL)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return loaded


@dataclass
class Encoder:
    model: Any
    name: str
    fingerprint: str
    device: str
    precision: str

    @property
    def resolution(self) -> int:
        return int(self.model.visual.input_resolution)

    @property
    def width(self) -> int:
        return int(self.model.visual.output_dim)

    def describe(self) -> dict[str, Any]:
        """What the store's manifest records about the encoder."""
        return {"name": self.name, "fingerprint": self.fingerprint, "resolution": self.resolution, "width": self.width}

    def _autocast(self) -> Any:
        import torch

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(kind, dtype=dtypes[self.precision], enabled=self.precision in dtypes)

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        """uint8 (n, R, R, 3) array or tensor -> float32 (n, width) CLIP image features."""
        import torch

        batch = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        mean, std = (torch.as_tensor(v, device=self.device).view(1, 3, 1, 1) for v in mean_std())
        with torch.inference_mode(), self._autocast():
            images = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            features = self.model.encode_image(images)
        return features.float().cpu().numpy()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 (n, width) CLIP text features."""
        import torch

        clip = _import_clip()
        tokens = clip.tokenize(texts, truncate=True).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens)
        return features.float().cpu().numpy()


def load_encoder(model: str = "ViT-B/32", device: str = "auto", precision: str = "auto") -> Encoder:
    """Load a CLIP model by name or checkpoint path onto a device."""
    import torch

    device = resolve_device(device)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise BadInput(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    precision = resolve_precision(precision, device)
    if device == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    loaded = _load_clip(model).float().eval().to(device)
    name = os.path.abspath(model) if os.path.isfile(model) else model
    return Encoder(loaded, name, _fingerprint(model), device, precision)
