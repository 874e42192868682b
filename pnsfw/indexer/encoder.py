"""The CLIP encoder: load by name (download, cached) or by checkpoint path; encode pixels and text.

Resolution, embedding width and the weights fingerprint come from the loaded
model, never from constants.
"""

import contextlib
import functools
import importlib.util
import os
import socket
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, ModelNotFound
from ..store.files import sha256_file
from .decode import mean_std
from .timeline import mark

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


@functools.lru_cache(maxsize=1)
def _clip_model() -> Any:
    """clip/model.py on its own. Building a model needs only it; `import clip` also loads torchvision, the
    tokenizer's vocabulary and pkg_resources (which scans every installed package): seconds of start-up."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return _import_clip().model
    path = os.path.join(next(iter(spec.submodule_search_locations)), "model.py")
    module_spec = importlib.util.spec_from_file_location("pnsfw_clip_model", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _fingerprint(model: str) -> str:
    if os.path.isfile(model):
        return sha256_file(Path(model))
    clip = _import_clip()

    return clip.clip._MODELS[model].split("/")[-2]  # OpenAI's URLs carry the sha256 of the file


def _checkpoint_path(model: str) -> str:
    """The checkpoint file of a path or a CLIP name (downloaded once into the cache, checksum verified)."""
    if os.path.isfile(model):
        return model
    clip = _import_clip()
    if model not in clip.available_models():
        raise ModelNotFound(f"unknown CLIP model {model!r}: not a file, and not one of {', '.join(clip.available_models())}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return clip.clip._download(clip.clip._MODELS[model], cache_dir())  # what clip.load itself calls
    except (OSError, RuntimeError) as exc:
        raise ModelNotFound(f"cannot download CLIP model {model!r} ({str(exc).splitlines()[0]}); offline? pass a "
                            f"checkpoint file: --model /path/to/checkpoint.pt (or set PNSFW_MODEL)") from None
    finally:
        socket.setdefaulttimeout(previous)


def _state_dict(path: str) -> dict[str, Any]:
    """The weights of a plain state dict, or of a TorchScript archive (OpenAI's releases), as clip.load reads them."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError):
        with open(path, "rb") as f:
            return torch.jit.load(f, map_location="cpu").eval().state_dict()


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """torch.nn.init's functions as no-ops (as transformers' no_init_weights does): the checkpoint overwrites
    every weight, so random initialisation (seconds for ViT-B/32) would be thrown away."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _build(state_dict: dict[str, Any]) -> Any:
    """clip.model.build_model (fp16 rounding of the weights included, so the model equals clip.load's) without
    its random initialisation."""
    with _no_init():
        return _clip_model().build_model(dict(state_dict)).float().eval()


def _load_clip(model: str) -> Any:
    path = _checkpoint_path(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load's hint on TorchScript files, load_state_dict's on meta
            return _build(_state_dict(path))
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ModelNotFound(f"cannot load CLIP checkpoint {path}: {str(exc).splitlines()[0]}") from None


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
    mark("torch imported")
    with ThreadPoolExecutor(1) as hashing:
        fingerprint = hashing.submit(_fingerprint, model)  # hashing a file of 0.3-1 GB, beside the load
        loaded = _load_clip(model)
        mark("CLIP checkpoint loaded")
        loaded = loaded.float().eval().to(device)
        mark(f"model on {device}")
        name = os.path.abspath(model) if os.path.isfile(model) else model
        return Encoder(loaded, name, fingerprint.result(), device, precision)
