"""`pnsfw train --zero-shot CONCEPTS`: a classifier with no training data, from CLIP text embeddings of concepts.

Each class c has the unit centroid t_c of its prompts' text embeddings (the store's CLIP text tower and
projection). For an image vector x (unit, store space), as Stable Diffusion's safety checker compares an image
with its concept embeddings:

    p_c = softmax_c(scale * cos(x, t_c) + bias_c),   bias_c = bias for NSFW classes, 0 for safe ones
    p_nsfw = sum of p_c over the NSFW classes

That is one Dense layer (kernel scale * T^T, bias) + softmax, or for two classes Dense(1, sigmoid) on the
difference, so the model is saved in the ordinary weights file and every reader (numpy, torch, ONNX) serves it.
With `--labels`, scale and bias are fitted (grid search, least log-loss) and the threshold picked on them.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BadInput
from ..store import Store, artifacts
from ..store.files import atomic_write, atomic_write_json
from . import metrics as M
from .data import LabelledData, labelled_vectors, nsfw_truth, resolve_classes
from .labels import read_labels
from .model import Classifier, check_name, model_paths
from .plots import save_plots
from .weights import Layer, fold, save_weights

DEFAULT_SCALE = 100.0  # CLIP's own logit scale (exp(4.6052))
SCALES = np.geomspace(5.0, 400.0, 36)
BIASES = np.linspace(-15.0, 15.0, 61)
CALIBRATION_ROWS = 50_000


@dataclass
class ZeroShotOptions:
    name: str = "zero-shot"
    nsfw_classes: list[str] | None = None
    labels: str | None = None  # calibrate scale, bias and threshold on these labels
    threshold_for: str | None = None


def read_concepts(path: "str | Path") -> list[tuple[str, str]]:
    """`label: prompt` lines (blank lines and `#` comments skipped) -> [(label, prompt)]."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read concepts {path}: {exc}") from None
    concepts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, prompt = line.partition(":")
        if not sep or not label.strip() or not prompt.strip():
            raise BadInput(f"{path}:{number}: expected `label: prompt`, got {line!r}")
        concepts.append((label.strip(), prompt.strip()))
    if not concepts:
        raise BadInput(f"{path}: no `label: prompt` lines")
    return concepts


def class_centroids(texts: np.ndarray, concepts: list[tuple[str, str]], classes: list[str]) -> np.ndarray:
    """(classes, dim): the normalised mean of each class's prompt embeddings."""
    labels = np.array([label for label, _ in concepts])
    centroids = np.stack([texts[labels == c].mean(axis=0) for c in classes])
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def zero_shot_layers(centroids: np.ndarray, classes: list[str], nsfw: list[str], scale: float,
                     bias: float) -> list[Layer]:
    """The one Dense layer computing the formula above (sigmoid of the logit difference for two classes)."""
    is_nsfw = np.array([c in nsfw for c in classes])
    biases = np.where(is_nsfw, bias, 0.0)
    if len(classes) == 2:
        pos, neg = int(np.argmax(is_nsfw)), int(np.argmin(is_nsfw))
        kernel = scale * (centroids[pos] - centroids[neg])[:, None]
        return [{"kind": "dense", "kernel": kernel, "bias": np.array([biases[pos] - biases[neg]]),
                 "activation": "sigmoid"}]
    return [{"kind": "dense", "kernel": scale * centroids.T, "bias": biases, "activation": "softmax"}]


def _p_nsfw(cosines: np.ndarray, is_nsfw: np.ndarray, scale: float, bias: float) -> np.ndarray:
    logits = scale * cosines + np.where(is_nsfw, bias, 0.0)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e[:, is_nsfw].sum(axis=1) / e.sum(axis=1)


def calibrate(centroids: np.ndarray, classes: list[str], nsfw: list[str], vectors: np.ndarray,
              truth: np.ndarray) -> tuple[float, float, float]:
    """(scale, bias, log-loss) of least log-loss on the labelled vectors (a seeded sample of at most 50k)."""
    if len(np.unique(truth)) < 2:
        raise BadInput("calibrating a zero-shot model needs labelled images of both kinds (NSFW and safe)")
    if len(vectors) > CALIBRATION_ROWS:
        rows = np.random.default_rng(0).choice(len(vectors), CALIBRATION_ROWS, replace=False)
        vectors, truth = vectors[rows], truth[rows]
    cosines = np.asarray(vectors, np.float32) @ centroids.T.astype(np.float32)
    is_nsfw = np.array([c in nsfw for c in classes])
    best = (np.inf, DEFAULT_SCALE, 0.0)
    for scale in SCALES:
        for bias in BIASES:
            p = np.clip(_p_nsfw(cosines, is_nsfw, scale, bias), 1e-7, 1 - 1e-7)
            loss = float(-np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p)))
            if loss < best[0]:
                best = (loss, float(scale), float(bias))
    return best[1], best[2], best[0]


def _labelled(store: Store, spec: str) -> tuple[LabelledData, Any]:
    label_set = read_labels(store, spec)
    return labelled_vectors(store, label_set.labels), label_set


def _save_labels(path: Path, labelled: "LabelledData | None") -> None:
    """The calibration labels (split `train`), or an empty table: what `explain` lists as neighbours."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = labelled.ids if labelled is not None else np.zeros(0, np.int64)
    labels = labelled.labels.tolist() if labelled is not None else []
    table = pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.string()),
                      "split": pa.array(["train"] * len(ids), pa.string())})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


class TextEmbedder(Protocol):
    """Texts -> unit vectors in the store's space (cli hands in pnsfw.indexer.embedding.EmbeddingService)."""

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32."""


def train_zero_shot(store_root: "str | Path", concepts_path: "str | Path",
                    open_embedder: "Callable[[Store], TextEmbedder]",
                    options: ZeroShotOptions | None = None) -> dict[str, Any]:
    """Build models/NAME from concept prompts, embedded by open_embedder(store) (calibrated on --labels when
    given); returns its metadata."""
    options = options or ZeroShotOptions()
    check_name(options.name)
    if M.parse_threshold_rule(options.threshold_for) and not options.labels:
        raise BadInput("--threshold-for picks the threshold on labelled images: give --labels too")
    started = time.time()
    store = Store.open(store_root)
    concepts = read_concepts(concepts_path)
    classes, nsfw = resolve_classes(dict(enumerate(label for label, _ in concepts)), options.nsfw_classes)
    prompts = open_embedder(store).embed_texts([prompt for _, prompt in concepts])
    centroids = class_centroids(prompts, concepts, classes)
    scale, bias, calibration, labelled, metrics = DEFAULT_SCALE, 0.0, None, None, {}
    threshold, choice = 0.5, None
    staged = artifacts.ModelStage(store, options.name)  # every file of the model: one generation
    paths = model_paths(staged.folder, options.name)
    if options.labels:
        labelled, label_set = _labelled(store, options.labels)
        truth = nsfw_truth(labelled.labels, classes, nsfw)
        scale, bias, loss = calibrate(centroids, classes, nsfw, labelled.vectors, truth)
        clf = Classifier(options.name, classes, nsfw, 0.5, store.space, {},
                         fold(zero_shot_layers(centroids, classes, nsfw, scale, bias)))
        p = clf.p_nsfw(labelled.vectors.astype(np.float32))
        choice = M.choose_threshold(truth, p, M.parse_threshold_rule(options.threshold_for), "labels")
        threshold = choice["threshold"]
        metrics = {"labels": M.binary_metrics(truth, p, threshold)}
        metrics["labels"]["plots"] = save_plots(truth, p, threshold, paths["plots"])
        calibration = {"labels": options.labels, "count": len(truth), "log_loss": loss,
                       "unknown": len(label_set.unknown)}
    save_weights(paths["weights"], zero_shot_layers(centroids, classes, nsfw, scale, bias))
    _save_labels(paths["labels"], labelled)
    meta = {"name": options.name, "kind": "zero-shot", "created": time.time(), "classes": classes,
            "nsfw_classes": nsfw, "output": "sigmoid" if len(classes) == 2 else "softmax", "threshold": threshold,
            "threshold_for": options.threshold_for, "threshold_choice": choice, "space": store.space,
            "dim": store.dim, "encoder": store.encoder, "projection": store.projection_info,
            "concepts": [{"label": label, "prompt": prompt} for label, prompt in concepts],
            "scale": scale, "bias": bias, "calibration": calibration, "metrics": metrics,
            "seconds": round(time.time() - started, 2)}
    meta = staged.relocate(meta)  # plot paths as they will be once committed
    atomic_write_json(paths["meta"], meta)
    staged.commit()
    return meta
