"""The pNSFWMedia classifier as scoring sees it: [BatchNorm -> Dense(tanh|gelu)] x L -> Dense(sigmoid|softmax).

Keras trains it (keras_io.py); scoring, search, the API and evaluation read the
plain weights file (weights.py) into numpy with every BatchNorm folded into the
Dense after it, so no command but `train` imports TensorFlow or Keras.
Where a model's files live is decided by the store (its current generation) through `model_paths` alone.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, ModelNotFound
from ..store import Store, artifacts
from ..store.files import sha256_file
from .verdict import verdict_dicts
from .weights import ACTIVATIONS, DenseStep, fold, forward, load_weights, save_weights

__all__ = ["ACTIVATIONS", "DEFAULT_NAME", "Classifier", "DenseStep", "forward", "load_classifier", "model_paths"]
log = logging.getLogger("pnsfw.classifier")
DEFAULT_NAME = "default"
CHUNK_ROWS = 1 << 16


def model_paths(store: "Store | Path", name: str) -> dict[str, Path]:
    """Every file model NAME owns, in its current generation folder (or in a folder being staged)
    (weights: what scoring reads; keras: what training saved)."""
    folder = store if isinstance(store, Path) else artifacts.model_folder(store, name)
    if folder is None:
        assert not isinstance(store, Path)
        available = ", ".join(list_models(store)) or "none; run `pnsfw train` first"
        raise ModelNotFound(f"no model {name!r} in store {store.root} (available: {available})")
    return {"weights": folder / f"{name}.weights.npz", "keras": folder / f"{name}.keras",
            "meta": folder / f"{name}.json", "labels": folder / f"{name}.labels.parquet",
            "plots": folder / f"{name}.plots", "logs": folder / f"{name}.logs", "onnx": folder / f"{name}.onnx"}


def check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise BadInput(f"bad model name {name!r}: use letters, digits, '-', '_' or '.'")
    return name


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
    keras_path: "Path | None" = None

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

    def verdicts(self, vectors: np.ndarray, threshold: "float | None" = None) -> list[dict[str, Any]]:
        """The verdict (pnsfw.classifier.verdict) of each row, as JSON-ready dicts."""
        return verdict_dicts(self, vectors, threshold)

    def keras_outputs(self, vectors: np.ndarray) -> np.ndarray:
        """The saved Keras model's own forward pass (imports Keras: the reference the numpy one is tested on)."""
        from .keras_io import keras_outputs

        if self.keras_path is None or not self.keras_path.is_file():
            raise ModelNotFound(f"model {self.name} has no .keras file")
        return keras_outputs(self.keras_path, vectors)


def _has_model(paths: dict[str, Path]) -> bool:
    return paths["meta"].is_file() and (paths["weights"].is_file() or paths["keras"].is_file())


def list_models(store: Store) -> list[str]:
    return artifacts.model_names(store)


def read_meta(store: Store, name: str) -> dict[str, Any]:
    paths = model_paths(store, check_name(name))
    if not _has_model(paths):
        raise ModelNotFound(f"model {name!r} of store {store.root} is incomplete ({paths['meta'].parent}); "
                            f"run `pnsfw repair --store {store.root}` or train it again")
    try:
        meta = json.loads(paths["meta"].read_text())
    except ValueError as exc:
        raise ModelNotFound(f"cannot read {paths['meta']}: {exc}") from None
    if not isinstance(meta, dict) or not {"classes", "nsfw_classes", "threshold", "space"} <= set(meta):
        raise ModelNotFound(f"{paths['meta']} is not a pnsfw model description")
    return meta


def convert_keras_model(paths: dict[str, Path]) -> list[dict[str, Any]]:
    """A model saved before weights files existed: read its .keras once (imports Keras) and write the weights
    file beside it, so later commands need no TensorFlow; a read-only store still gets scored (in memory)."""
    from .keras_io import keras_layers, load_keras

    layers = keras_layers(load_keras(paths["keras"]))
    try:
        save_weights(paths["weights"], layers)
        log.warning("model %s had only %s: wrote %s once (no TensorFlow needed from now on)",
                    paths["meta"].stem, paths["keras"].name, paths["weights"].name)
    except OSError as exc:
        log.warning("model %s: cannot write %s (%s); converted in memory", paths["meta"].stem,
                    paths["weights"], exc.strerror)
    return layers


def _check_outputs(name: str, meta: dict[str, Any], steps: list[DenseStep]) -> None:
    """The weights and the description of one model must agree (never score 3 classes with 2 names)."""
    width, classes = steps[-1].weight.shape[1], list(meta["classes"])
    if width != (1 if len(classes) == 2 else len(classes)):
        raise ModelNotFound(f"model {name}: its weights have {width} outputs but its description names the "
                            f"classes {', '.join(classes)}; retrain it (`pnsfw train --name {name}`)")
    if "dim" in meta and int(meta["dim"]) != steps[0].weight.shape[0]:
        raise ModelNotFound(f"model {name}: weights of width {steps[0].weight.shape[0]}, description {meta['dim']}")


def load_classifier(store: Store, name: str = DEFAULT_NAME, check_space: bool = True) -> Classifier:
    """Load models/NAME (weights + description) into numpy; the store must be in the model's embedding space."""
    meta = read_meta(store, name)
    if check_space:
        store.check_space(meta["space"], f"model {name!r}")
    paths = model_paths(store, name)
    layers = load_weights(paths["weights"]) if paths["weights"].is_file() else convert_keras_model(paths)
    steps = fold(layers)
    _check_outputs(name, meta, steps)
    fingerprint = sha256_file(paths["weights"])[:16] if paths["weights"].is_file() else "unsaved"
    return Classifier(name=name, classes=list(meta["classes"]), nsfw_classes=list(meta["nsfw_classes"]),
                      threshold=float(meta["threshold"]), space=meta["space"], meta=meta, steps=steps,
                      fingerprint=fingerprint, keras_path=paths["keras"] if paths["keras"].is_file() else None)


def model_fingerprint(store: Store, name: str) -> str:
    """What scores record of the model that made them (the weights file's checksum); '' when it has none."""
    path = model_paths(store, name)["weights"]
    return sha256_file(path)[:16] if path.is_file() else ""
