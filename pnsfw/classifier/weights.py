"""The classifier's plain weights file, NAME.weights.npz: what scoring reads, with numpy only (no Keras).

One npz holds the raw tensors of every layer (BatchNorm: gamma, beta, moving mean and variance; Dense: kernel
and bias) and, under `architecture`, a JSON list of the layers in order (kind, activation, epsilon). Training
writes it beside the .keras file; `fold` turns it into Dense steps with each BatchNorm folded into the Dense
that follows it, so inference is a few matmuls, exact to float rounding.
"""

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelNotFound
from ..store.files import atomic_write

FORMAT = 1
TENSORS = {"batchnorm": ("gamma", "beta", "mean", "var"), "dense": ("kernel", "bias")}
Layer = dict[str, Any]  # {"kind": "batchnorm"|"dense", tensors..., "epsilon" | "activation"}


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2))))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warning for large |x|


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh, "gelu": _gelu, "sigmoid": _sigmoid, "softmax": _softmax, "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
}


@dataclass
class DenseStep:
    """One folded layer: activation(x @ weight + bias)."""

    weight: np.ndarray
    bias: np.ndarray
    activation: str


def save_weights(path: Path, layers: list[Layer]) -> None:
    """Write the layers (raw tensors + architecture JSON) as one npz, atomically."""
    arrays: dict[str, np.ndarray] = {}
    architecture = []
    for i, layer in enumerate(layers):
        names = TENSORS[layer["kind"]]
        arrays.update({f"{i}.{n}": np.asarray(layer[n], np.float32) for n in names})
        architecture.append({k: v for k, v in layer.items() if k not in names})
    arrays["architecture"] = np.array(json.dumps({"format": FORMAT, "layers": architecture}))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_weights(path: Path) -> list[Layer]:
    """The layers of a weights file; ModelNotFound (one line) when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            spec = json.loads(str(data["architecture"]))
            if spec.get("format") != FORMAT:
                raise ValueError(f"weights format {spec.get('format')!r}, this pnsfw reads {FORMAT}")
            return [dict(layer, **{n: data[f"{i}.{n}"] for n in TENSORS[layer["kind"]]})
                    for i, layer in enumerate(spec["layers"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelNotFound(f"cannot read model weights {path}: {str(exc).splitlines()[0]}") from None


def fold(layers: list[Layer]) -> list[DenseStep]:
    """Layers -> dense steps, each BatchNorm folded into the Dense after it (in float64, then float32)."""
    steps: list[DenseStep] = []
    pending = None
    for layer in layers:
        if layer["kind"] == "batchnorm":
            gamma, beta, mean, var = (np.asarray(layer[n], np.float64) for n in TENSORS["batchnorm"])
            scale = gamma / np.sqrt(var + float(layer["epsilon"]))
            pending = (scale, beta - mean * scale)
            continue
        weight, bias = np.asarray(layer["kernel"], np.float64), np.asarray(layer["bias"], np.float64)
        if pending is not None:
            weight, bias = pending[0][:, None] * weight, pending[1] @ weight + bias
            pending = None
        if layer["activation"] not in ACTIVATIONS:
            raise ModelNotFound(f"unsupported activation {layer['activation']!r} in classifier")
        steps.append(DenseStep(weight.astype(np.float32), bias.astype(np.float32), layer["activation"]))
    if not steps or pending is not None:
        raise ModelNotFound("classifier weights must end with a Dense layer")
    return steps


def forward(steps: list[DenseStep], x: np.ndarray) -> np.ndarray:
    """The folded network in numpy, float32 (in-place activations where possible)."""
    h = np.asarray(x, dtype=np.float32)
    for step in steps:
        h = h @ step.weight
        h += step.bias
        h = np.tanh(h, out=h) if step.activation == "tanh" else ACTIVATIONS[step.activation](h)
    return h
