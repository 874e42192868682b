"""The pNSFWMedia classifier: [BatchNorm -> Dense(units, tanh|gelu) (-> Dropout)] x L -> Dense(sigmoid|softmax).

Keras builds, trains and saves it (backend-neutral Keras 3). For inference the
weights are read once into numpy with every BatchNorm folded into the Dense
after it, so bulk scoring is a few matmuls, exact to float rounding, with no
per-call framework overhead.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, ModelNotFound
from ..store import Store
from ..store.files import sha256_file

DEFAULT_NAME = "default"
CHUNK_ROWS = 1 << 16


def models_dir(store: Store) -> Path:
    return store.root / "models"


def model_paths(store: Store, name: str) -> dict[str, Path]:
    """Every file a model NAME owns in STORE/models/."""
    folder = models_dir(store)
    return {"keras": folder / f"{name}.keras", "meta": folder / f"{name}.json",
            "labels": folder / f"{name}.labels.parquet", "plots": folder / f"{name}.plots",
            "logs": folder / f"{name}.logs", "onnx": folder / f"{name}.onnx"}


def check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise BadInput(f"bad model name {name!r}: use letters, digits, '-', '_' or '.'")
    return name


def build_model(dim: int, outputs: int, units: int = 256, layers: int = 1, activation: str = "tanh",
                dropout: float = 0.0, lr: float = 1e-3) -> Any:
    """A compiled Keras model; outputs == 1 means binary (sigmoid), else softmax."""
    from .backend import import_keras

    keras = import_keras()
    inputs = keras.Input((dim,), name="embedding")
    x = inputs
    for i in range(layers):
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.Dense(units, activation=activation, name=f"dense_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    head = "sigmoid" if outputs == 1 else "softmax"
    model = keras.Model(inputs, keras.layers.Dense(outputs, activation=head, name="head")(x), name="pnsfw")
    loss = "binary_crossentropy" if outputs == 1 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    return model


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


def _bn_affine(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (np.asarray(w, np.float64) for w in layer.get_weights())
    scale = gamma / np.sqrt(var + layer.epsilon)
    return scale, beta - mean * scale


def fold_layers(model: Any) -> list[DenseStep]:
    """Keras model -> dense steps, each BatchNorm folded into the Dense that follows it."""
    steps, pending = [], None
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            pending = _bn_affine(layer)
        elif kind == "Dense":
            weight, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
            if pending is not None:
                scale, shift = pending
                weight, bias = scale[:, None] * weight, shift @ weight + bias
                pending = None
            steps.append(DenseStep(weight.astype(np.float32), bias.astype(np.float32), layer.activation.__name__))
        elif kind not in ("InputLayer", "Dropout"):
            raise BadInput(f"unsupported layer {kind} in classifier")
    for step in steps:
        if step.activation not in ACTIVATIONS:
            raise BadInput(f"unsupported activation {step.activation!r} in classifier")
    return steps


def forward(steps: list[DenseStep], x: np.ndarray) -> np.ndarray:
    """The folded network in numpy, float32 (in-place activations where possible)."""
    h = np.asarray(x, dtype=np.float32)
    for step in steps:
        h = h @ step.weight
        h += step.bias
        h = np.tanh(h, out=h) if step.activation == "tanh" else ACTIVATIONS[step.activation](h)
    return h


@dataclass
class Classifier:
    name: str
    classes: list[str]
    nsfw_classes: list[str]
    threshold: float
    space: str
    meta: dict[str, Any]
    steps: list[DenseStep] = field(repr=False, default_factory=list)
    fingerprint: str = ""
    path: "Path | None" = None

    @property
    def binary(self) -> bool:
        return self.steps[-1].weight.shape[1] == 1

    @property
    def dim(self) -> int:
        return int(self.steps[0].weight.shape[0])

    def outputs(self, vectors: np.ndarray) -> np.ndarray:
        """Raw model outputs ((n, 1) sigmoid or (n, C) softmax) in chunks."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise BadInput(f"model {self.name} takes vectors of width {self.dim}, got shape {vectors.shape}")
        parts = [forward(self.steps, vectors[i:i + CHUNK_ROWS]) for i in range(0, len(vectors), CHUNK_ROWS)]
        width = self.steps[-1].weight.shape[1]
        return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """(n, len(classes)) float32."""
        return self.to_probabilities(self.outputs(vectors))

    def p_nsfw(self, vectors: np.ndarray) -> np.ndarray:
        """(n,) float32: the sigmoid (binary) or the sum of the NSFW classes (softmax)."""
        return self.to_p_nsfw(self.outputs(vectors))

    def to_probabilities(self, out: np.ndarray) -> np.ndarray:
        if not self.binary:
            return out.astype(np.float32, copy=False)
        probs = np.empty((len(out), 2), np.float32)
        positive = self.classes.index(self.nsfw_classes[0])
        probs[:, positive], probs[:, 1 - positive] = out[:, 0], 1.0 - out[:, 0]
        return probs

    def to_p_nsfw(self, out: np.ndarray) -> np.ndarray:
        if self.binary:
            return out[:, 0].astype(np.float32, copy=True)
        columns = [self.classes.index(c) for c in self.nsfw_classes]
        return out[:, columns].sum(axis=1).astype(np.float32)

    def keras_model(self) -> Any:
        """The saved Keras model itself (for parity checks and export)."""
        from .backend import import_keras

        return import_keras().saving.load_model(self.path, compile=False)

    def keras_outputs(self, vectors: np.ndarray) -> np.ndarray:
        """The saved Keras model's own forward pass (reference for the folded numpy one)."""
        from .backend import import_keras

        keras = import_keras()
        model = self.keras_model()
        return keras.ops.convert_to_numpy(model(np.asarray(vectors, np.float32), training=False))


def list_models(store: Store) -> list[str]:
    folder = models_dir(store)
    return sorted(p.name[:-len(".keras")] for p in folder.glob("*.keras")) if folder.is_dir() else []


def read_meta(store: Store, name: str) -> dict[str, Any]:
    paths = model_paths(store, check_name(name))
    if not paths["keras"].is_file() or not paths["meta"].is_file():
        available = ", ".join(list_models(store)) or "none; run `pnsfw train` first"
        raise ModelNotFound(f"no model {name!r} in {models_dir(store)} (available: {available})")
    try:
        return json.loads(paths["meta"].read_text())
    except ValueError as exc:
        raise ModelNotFound(f"cannot read {paths['meta']}: {exc}") from None


def load_classifier(store: Store, name: str = DEFAULT_NAME, check_space: bool = True) -> Classifier:
    """Load models/NAME.keras with its metadata; the store must be in the model's embedding space."""
    meta = read_meta(store, name)
    if check_space:
        store.check_space(meta["space"], f"model {name!r}")
    path = model_paths(store, name)["keras"]
    from .backend import import_keras

    keras = import_keras()
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a broken archive
        raise ModelNotFound(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None
    return Classifier(name=name, classes=list(meta["classes"]), nsfw_classes=list(meta["nsfw_classes"]),
                      threshold=float(meta["threshold"]), space=meta["space"], meta=meta,
                      steps=fold_layers(model), fingerprint=sha256_file(path)[:16], path=path)
