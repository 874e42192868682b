"""`pnsfw train`: fit the Keras classifier on labelled store vectors, pick the threshold, report test metrics."""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput
from ..store import Store, artifacts
from ..store.files import atomic_write, atomic_write_json
from ..store.maintenance import check_shards
from . import metrics as M
from .compare import compare_with_previous, previous_model
from .data import SPLITS, LabelledData, labelled_vectors, nsfw_truth, resolve_classes, stratified_split
from .evaluate import report
from .labels import ABSTAIN, LabelSet, read_labels
from .model import DEFAULT_NAME, Classifier, check_name, model_paths
from .weights import fold, save_weights


@dataclass
class TrainOptions:
    """Options of `pnsfw train` (see its --help)."""

    name: str = DEFAULT_NAME
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    units: int = 256
    layers: int = 1
    activation: str = "tanh"
    dropout: float = 0.0
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    class_weight: bool = True
    tune: bool = False
    max_trials: int = 30
    nsfw_classes: list[str] | None = None
    ignore_labels: tuple[str, ...] = ABSTAIN  # labels that are no class (reviewers' abstentions)
    threshold_for: str | None = None
    seed: int = 0
    patience: int = 5
    verbose: int = 0

    def hyper(self) -> dict[str, Any]:
        return {"units": self.units, "layers": self.layers, "activation": self.activation,
                "dropout": self.dropout, "lr": self.lr}


def check_options(options: TrainOptions) -> None:
    from .tune import ACTIVATION_CHOICES

    check_name(options.name)
    if options.activation not in ACTIVATION_CHOICES:
        raise BadInput(f"--activation {options.activation!r}: use one of {', '.join(ACTIVATION_CHOICES)}")
    if options.layers not in (1, 2) or options.units < 1 or options.epochs < 1 or options.batch_size < 1:
        raise BadInput("--layers must be 1 or 2, and --units, --epochs, --batch-size positive")
    if not 0 <= options.dropout < 1:
        raise BadInput("--dropout must be in [0, 1)")
    M.parse_threshold_rule(options.threshold_for)  # a bad rule fails before any training


def targets(labels: np.ndarray, classes: list[str], nsfw: list[str]) -> np.ndarray:
    """Binary: 1.0 for NSFW, shape (n, 1); softmax: the class index."""
    if len(classes) == 2:
        return np.isin(labels, nsfw).astype(np.float32)[:, None]
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=np.int64)


def class_weights(y: np.ndarray) -> dict[int, float]:
    """'balanced' weights: n / (k * count) per class."""
    values, counts = np.unique(y.reshape(-1).astype(np.int64), return_counts=True)
    return {int(v): float(len(y) / (len(values) * c)) for v, c in zip(values, counts)}


def _tensorboard_works(backend: str) -> bool:
    """Keras' TensorBoard callback writes through tf.summary, which needs the tensorboard package."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


def _callbacks(options: TrainOptions, logs: "Path | None", has_val: bool) -> list[Any]:
    from .backend import import_keras

    keras = import_keras()
    monitor = "val_loss" if has_val else "loss"
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=options.patience,
                                               restore_best_weights=True)]
    if logs is not None and _tensorboard_works(keras.backend.backend()):
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(logs)))
    return callbacks


def fit(data: dict[str, tuple[np.ndarray, np.ndarray]], outputs: int, hyper: dict[str, Any],
        options: TrainOptions, logs: "Path | None" = None) -> tuple[Any, dict[str, Any]]:
    """Build and fit one model; early stopping restores the best weights."""
    from .backend import import_keras
    from .keras_io import build_model

    keras = import_keras()
    keras.utils.set_random_seed(options.seed)
    (x, y), (xv, yv) = data["train"], data["val"]
    model = build_model(x.shape[1], outputs, **hyper)
    has_val = len(xv) > 0
    history = model.fit(x, y, validation_data=(xv, yv) if has_val else None, epochs=options.epochs,
                        batch_size=options.batch_size, shuffle=True, verbose=options.verbose,
                        class_weight=class_weights(y) if options.class_weight else None,
                        callbacks=_callbacks(options, logs, has_val))
    losses = history.history.get("val_loss" if has_val else "loss", [])
    best = int(np.argmin(losses)) + 1 if losses else 0
    return model, {"epochs_run": len(losses), "best_epoch": best,
                   "best_loss": float(min(losses)) if losses else None}


def split_arrays(labelled: LabelledData, split: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x = labelled.vectors.astype(np.float32)
    return {name: (x[split == name], y[split == name]) for name in SPLITS}


def _choose_threshold(clf: Classifier, labelled: LabelledData, split: np.ndarray,
                      rule: "tuple[str, float] | None") -> dict[str, Any]:
    """The threshold of --threshold-for, picked on the validation split (train when there is none)."""
    on = "val" if (split == "val").any() else "train"
    rows = split == on
    p = clf.to_p_nsfw(clf.outputs(labelled.vectors[rows]))
    return M.choose_threshold(nsfw_truth(labelled.labels[rows], clf.classes, clf.nsfw_classes), p, rule, on)


def _save_labels(path: Path, labelled: LabelledData, split: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(labelled.ids, pa.int64()),
                      "label": pa.array(labelled.labels.tolist(), pa.string()),
                      "split": pa.array(split.tolist(), pa.string())})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _counts(labelled: LabelledData, split: np.ndarray) -> dict[str, dict[str, int]]:
    return {name: {str(c): int(n) for c, n in zip(*np.unique(labelled.labels[split == name].astype(str),
                                                             return_counts=True))} for name in SPLITS}


def _choose_hyper(data: dict[str, Any], outputs: int, options: TrainOptions) -> tuple[dict[str, Any], Any]:
    if not options.tune:
        return options.hyper(), None
    from .tune import tune

    return tune(data, outputs, options)


def train_classifier(store_root: "str | Path", labels_spec: str, options: TrainOptions | None = None) -> dict[str, Any]:
    """Train models/NAME (weights.npz, .keras, .json) on the labelled vectors of a store; returns the saved metadata."""
    options = options or TrainOptions()
    check_options(options)
    started = time.time()
    store = Store.open(store_root)
    check_shards(store)
    label_set = read_labels(store, labels_spec, options.ignore_labels)
    classes, nsfw = resolve_classes(label_set.labels, options.nsfw_classes)
    labelled = labelled_vectors(store, label_set.labels)
    split = stratified_split(labelled.labels, options.val_ratio, options.test_ratio, options.seed)
    data = split_arrays(labelled, split, targets(labelled.labels, classes, nsfw))
    outputs = 1 if len(classes) == 2 else len(classes)
    hyper, tuning = _choose_hyper(data, outputs, options)
    staged = artifacts.ModelStage(store, options.name)  # every file of the model: one generation
    paths = model_paths(staged.folder, options.name)
    model, history = fit(data, outputs, hyper, options, paths["logs"])
    from .keras_io import keras_layers, save_keras

    layers = keras_layers(model)
    clf = Classifier(options.name, classes, nsfw, 0.5, store.space, {}, fold(layers))
    choice = _choose_threshold(clf, labelled, split, M.parse_threshold_rule(options.threshold_for))
    threshold = choice["threshold"]
    eval_split = "test" if (split == "test").any() else "val" if (split == "val").any() else "train"
    metrics = {eval_split: report(clf, labelled, split == eval_split, threshold, paths["plots"])}
    choice["evaluated"] = M.reached_on(metrics[eval_split], eval_split, choice)
    retrain = compare_with_previous(store, previous_model(store, options.name), clf, threshold, metrics[eval_split],
                                    lambda prev: report(prev, labelled, split == eval_split, prev.threshold))
    save_weights(paths["weights"], layers)  # what every other command reads (numpy, no Keras)
    save_keras(model, paths["keras"])
    _save_labels(paths["labels"], labelled, split)
    meta = _metadata(store, options, classes, nsfw, threshold, hyper, history, metrics, label_set, labelled, split)
    meta.update(tuning=tuning, evaluated_on=eval_split, threshold_choice=choice,
                seconds=round(time.time() - started, 2), retrain=retrain)
    meta = staged.relocate(meta)  # plot paths as they will be once committed
    atomic_write_json(paths["meta"], meta)
    staged.commit()
    return meta


def _metadata(store: Store, options: TrainOptions, classes: list[str], nsfw: list[str], threshold: float,
              hyper: dict[str, Any], history: dict[str, Any], metrics: dict[str, Any], label_set: LabelSet,
              labelled: LabelledData, split: np.ndarray) -> dict[str, Any]:
    from .backend import import_keras

    keras = import_keras()
    return {
        "name": options.name, "created": time.time(), "classes": classes, "nsfw_classes": nsfw,
        "output": "sigmoid" if len(classes) == 2 else "softmax", "threshold": threshold,
        "threshold_for": options.threshold_for, "space": store.space, "dim": store.dim,
        "encoder": store.encoder, "projection": store.projection_info,
        "config": dict(asdict(options), **hyper), "history": history,
        "data": {"labels": len(label_set.labels), "unknown": len(label_set.unknown),
                 "unknown_examples": label_set.unknown[:5], "unlabelled": label_set.unlabelled,
                 "ignored": label_set.ignored,
                 "counts": _counts(labelled, split)},
        "metrics": metrics, "keras_version": keras.__version__, "backend": keras.backend.backend(),
    }
