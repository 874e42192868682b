"""The CLIP encoder: load by name (download, cached) or by checkpoint path; encode pixels and text.

Resolution, embedding width and the weights fingerprint come from the loaded
model, never from constants.
"""

import functools
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import auto_device
from ..errors import BadInput, ModelNotFound
from ..store.files import sha256_file
from .decode import mean_std
from .timeline import mark

log = logging.getLogger(__name__)
DEFAULT_MODEL = "ViT-B/32"
DOWNLOAD_TIMEOUT_S = 30  # per socket operation of the checkpoint download
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
# OpenAI's releases, as openai/CLIP lists them: the sha256 of each file is the folder of its URL
CHECKPOINTS: dict[str, str] = {
    "RN50": f"{_OPENAI}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_OPENAI}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_OPENAI}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_OPENAI}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_OPENAI}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                      "ViT-L-14-336px.pt",
}


def cache_dir() -> str:
    """Where named checkpoints are kept: $XDG_CACHE_HOME/clip (~/.cache/clip, as openai/CLIP uses)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clip")


def resolve_device(device: str) -> str:
    """auto -> devices.auto_device(); cuda refused with one line when torch sees no GPU."""
    if device == "auto":
        return auto_device()
    import torch

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


def _clip_file(name: str) -> Any:
    """clip/NAME.py on its own, without running clip/__init__.py: `import clip` also loads torchvision (~170 MB
    of memory), the tokenizer's vocabulary and pkg_resources (which scans every installed package): seconds of
    start-up that building a model or tokenizing text does not need."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return getattr(_import_clip(), name)
    path = os.path.join(next(iter(spec.submodule_search_locations)), f"{name}.py")
    module_name = f"pnsfw_clip_{name}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # found by name where its classes are looked up (torch.compile, pickle)
    module_spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _clip_model() -> Any:
    return _clip_file("model")


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    return _clip_file("simple_tokenizer").SimpleTokenizer()


def tokenize(texts: list[str], context_length: int = 77) -> Any:
    """clip.tokenize(texts, context_length, truncate=True): a (n, context_length) int64 tensor."""
    import torch

    tokenizer = _tokenizer()
    start, end = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [*[start, *tokenizer.encode(text)][: context_length - 1], end]
        result[row, : len(tokens)] = torch.tensor(tokens)
    return result


def known_fingerprint(model: str) -> "str | None":
    """What load_encoder records for MODEL, without loading it: a file's sha256, or the sha256 that a CLIP
    name's download URL carries (CHECKPOINTS); None for other names."""
    if os.path.isfile(model):
        return sha256_file(Path(model))
    url = CHECKPOINTS.get(model)
    return None if url is None else url.split("/")[-2]


def _fingerprint(model: str) -> str:
    """known_fingerprint of a model that _checkpoint_path resolves (a file or a CHECKPOINTS name)."""
    found = known_fingerprint(model)
    if found is None:
        raise ModelNotFound(f"unknown CLIP model {model!r}")
    return found


def _download(url: str, target: Path) -> None:
    """url -> target through a temporary file in the same folder, checksum verified before the rename."""
    expected = url.split("/")[-2]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            log.info("downloading %s to %s", url, target)
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as source:
                shutil.copyfileobj(source, out, 1 << 20)
            out.close()
            if sha256_file(Path(out.name)) != expected:
                raise OSError(f"the download of {url} does not match its sha256 {expected[:12]}")
            os.replace(out.name, target)
        finally:
            if os.path.exists(out.name):
                os.unlink(out.name)


def check_model(model: str) -> None:
    """ModelNotFound unless MODEL is a file or a CLIP name pnsfw can download (nothing is read or fetched)."""
    if not os.path.isfile(model) and model not in CHECKPOINTS:
        raise ModelNotFound(f"unknown CLIP model {model!r}: not a file, and not one of {', '.join(CHECKPOINTS)}")


def _checkpoint_path(model: str) -> str:
    """The checkpoint file of a path or a CLIP name (downloaded once into the cache, checksum verified)."""
    check_model(model)
    if os.path.isfile(model):
        return model
    url = CHECKPOINTS[model]
    target = Path(cache_dir()) / os.path.basename(url)
    if target.is_file() and sha256_file(target) == url.split("/")[-2]:
        return str(target)
    if target.is_file():
        log.warning("%s does not match its sha256: downloading it again", target)
    try:
        _download(url, target)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot download CLIP model {model!r} ({str(exc).splitlines()[0]}); offline? pass a "
                            f"checkpoint file: --model /path/to/checkpoint.pt (or set PNSFW_MODEL)") from None
    return str(target)


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


# initialisers (tensor methods and torch.nn.init's, which take the tensor by keyword and whose inner tensor
# calls the mode does not see), and load_state_dict's copy
_SKIPPED = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "kaiming_uniform_", "kaiming_normal_",
                      "xavier_uniform_", "xavier_normal_", "trunc_normal_", "constant_", "zeros_", "ones_"})


def _tensor_argument(args: tuple, kwargs: Any) -> Any:
    """The tensor an initialiser fills: its first argument, or torch.nn.init's `tensor=` keyword."""
    import torch

    first = args[0] if args else (kwargs or {}).get("tensor")
    return first if isinstance(first, torch.Tensor) else None


def _no_init_mode() -> Any:
    """A torch-function mode under which CLIP's __init__ and build_model cost allocations only: random and
    constant initialisers and copies into parameters do nothing, `.half()` returns an uninitialised fp16 tensor.
    The checkpoint's tensors then replace every weight (`load_state_dict(assign=True)`).

    Not the meta device: elementwise ops on meta tensors run Python reference kernels, whose first call imports
    torch._dynamo (4-5 s of the encoder load on an H200 machine, ~1.4 s on 2 cores; docs/benchmarks.md)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class NoInit(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
            name = getattr(func, "__name__", "")
            if name in _SKIPPED and (tensor := _tensor_argument(args, kwargs)) is not None:
                return tensor
            if name == "half" and args and isinstance(args[0], torch.Tensor):
                return torch.empty(args[0].shape, dtype=torch.float16)
            return func(*args, **(kwargs or {}))

    return NoInit()


def _build(state_dict: dict[str, Any], device: str = "cpu") -> Any:
    """clip.model.build_model's model on `device`, built with no initialisation (`_no_init_mode`) and then
    given the checkpoint's tensors (`load_state_dict(assign=True)`); the same fp16 rounding of the weights as
    build_model's, so it equals clip.load's model bit for bit. The rounding and the cast back to fp32 run on
    `device` (on a GPU two passes over the weights that cost the CPU ~0.5 s of the start-up)."""
    clip_model = _clip_model()
    weights = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    with _no_init_mode():
        model = clip_model.build_model(dict(state_dict))  # its own fp16 conversion and load do nothing here
    model.load_state_dict(weights, assign=True)  # strict: a weight missing from the checkpoint raises
    model.to(device)
    clip_model.convert_weights(model)
    mask = model.build_attention_mask()  # a plain attribute, not in the state dict: built here for real
    for block in model.transformer.resblocks:
        block.attn_mask = mask
    return model.float().eval()


def _load_clip(model: str, device: str = "cpu") -> Any:
    path = _checkpoint_path(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load's hint on TorchScript files, load_state_dict's on meta
            state_dict = _state_dict(path)
            mark("CLIP checkpoint read")
            return _build(state_dict, device)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ModelNotFound(f"cannot load CLIP checkpoint {path}: {str(exc).splitlines()[0]}") from None


def describe_encoder(model: str = "ViT-B/32", device: str = "cpu", precision: str = "fp32") -> "Encoder":
    """The encoder as a store records it (name, fingerprint, resolution, width), its weights left on disk: the
    model is built from the checkpoint's shapes under `_no_init_mode` (a memory-mapped read; its tensors are
    allocated, never written, so untouched). For a driver whose workers encode (the Ray runner); `device` is
    the driver's, and encode_* must not be called (the weights are garbage)."""
    import torch  # noqa: F401  (before the timeline's mark, as in load_encoder)

    mark("torch imported")
    with ThreadPoolExecutor(1) as hashing:
        fingerprint = hashing.submit(_fingerprint, model)
        path = _checkpoint_path(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # as in _load_clip
                state_dict = _state_dict(path)
                with _no_init_mode():
                    built = _clip_model().build_model(dict(state_dict))
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise ModelNotFound(f"cannot load CLIP checkpoint {path}: {str(exc).splitlines()[0]}") from None
        mark("CLIP checkpoint described")
        name = os.path.abspath(model) if os.path.isfile(model) else model
        return Encoder(built, name, fingerprint.result(), device, precision)


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
        dtype = dtypes.get(self.precision)  # fp32: autocast off (its dtype is then not used)
        return torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

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

        tokens = tokenize(texts, int(self.model.context_length)).to(self.device)
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens)
        return features.float().cpu().numpy()


def load_encoder(model: str = "ViT-B/32", device: str = "auto", precision: str = "auto") -> Encoder:
    """Load a CLIP model by name or checkpoint path onto a device."""
    with ThreadPoolExecutor(1) as hashing:
        # hashing a file of 0.3-1 GB (it also reads the checkpoint into the page cache), beside torch's import
        fingerprint = hashing.submit(_fingerprint, model)
        import torch

        device = resolve_device(device)
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise BadInput(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
        precision = resolve_precision(precision, device)
        if device == "cpu":
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        mark("torch imported")
        loaded = _load_clip(model, device)
        mark("CLIP checkpoint loaded")
        loaded = loaded.float().eval().to(device)
        mark(f"model on {device}")
        name = os.path.abspath(model) if os.path.isfile(model) else model
        return Encoder(loaded, name, fingerprint.result(), device, precision)
