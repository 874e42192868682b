"""`pnsfw evaluate` (and the reports of `train`): a model's metrics on labelled rows it did not train on.

The held-out rows are the model's own test split, as `train` recorded it in NAME.labels.parquet, plus labelled
rows the model never saw (labelled after it was trained); `--split all` takes every labelled row, training
rows included, and says so. Label counts and how each label maps to NSFW/safe are part of the result, and an
empty or one-class selection is a warning (its undefined metrics are None, never NaN).
"""

from pathlib import Path
from typing import Any

import numpy as np

from ..store import Store
from . import metrics as M
from .data import LabelledData, label_mapping, labelled_vectors, nsfw_truth
from .labels import ABSTAIN, read_labels
from .model import Classifier, load_classifier, model_paths
from .plots import save_plots

NEW = "new"  # a labelled row the model's recorded split does not list: never trained on
SELECT: dict[str, frozenset[str]] = {"test": frozenset({"test", NEW}), "all": frozenset({"train", "val", "test", NEW})}


def report(clf: Classifier, labelled: LabelledData, rows: np.ndarray, threshold: float,
           plots: "Path | None" = None, prefix: str = "") -> dict[str, Any]:
    """Binary NSFW metrics (and the class confusion for softmax) on the chosen rows, PNGs into `plots`."""
    out = clf.outputs(labelled.vectors[rows])
    p, labels = clf.to_p_nsfw(out), labelled.labels[rows]
    truth = nsfw_truth(labels, clf.classes, clf.nsfw_classes)
    result = M.binary_metrics(truth, p, threshold)
    if not clf.binary and all(label in clf.classes for label in labels):
        predicted = [clf.classes[i] for i in clf.to_probabilities(out).argmax(axis=1)]
        result["class_confusion"] = M.class_confusion(list(labels), predicted, clf.classes)
    if plots is not None:
        result["plots"] = save_plots(truth, p, threshold, plots, prefix, result.get("class_confusion"))
    return result


def recorded_splits(store: Store, name: str, ids: np.ndarray) -> "np.ndarray | None":
    """The split train put each id in (NEW for ids it did not list); None when the model records no split."""
    import pyarrow.parquet as pq

    path = model_paths(store, name)["labels"]
    if not path.is_file():
        return None
    table = pq.read_table(path, columns=["id", "split"])
    known = dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))
    return np.array([known.get(int(i), NEW) for i in ids], dtype=object)


def _counts(values: np.ndarray) -> dict[str, int]:
    return {str(k): int(n) for k, n in zip(*np.unique(values.astype(str), return_counts=True))} if len(values) else {}


def _warnings(split: str, name: str, splits: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> list[str]:
    """One line per reason the numbers are missing, partial or optimistic."""
    warnings = []
    trained = int(np.isin(splits[rows], ["train", "val"]).sum())
    if trained:
        warnings.append(f"--split all: {trained:,} of the {int(rows.sum()):,} rows were used to train model {name} "
                        "(train/val): these metrics are optimistic, not a held-out estimate")
    if not rows.any():
        warnings.append(f"the {split} split of model {name} holds none of these {len(splits):,} labelled rows "
                        "(all were used in training): nothing to measure; --split all includes training rows")
    elif truth.all() or not truth.any():
        kind = "NSFW" if truth.all() else "safe"
        warnings.append(f"the {split} split holds only {kind} rows ({len(truth):,}): PR-AUC, ROC-AUC and "
                        "precision@recall0.9 are undefined (n/a)")
    return warnings


def evaluate_classifier(store_root: "str | Path", name: str, labels_spec: str, split: str = "test",
                        plots: "Path | None" = None, ignore: tuple[str, ...] = ABSTAIN) -> dict[str, Any]:
    """The model's metrics at its stored threshold on the labelled rows of `split` (see the module docstring);
    labels in `ignore` are no class and are left out."""
    store = Store.open(store_root)
    clf = load_classifier(store, name)
    label_set = read_labels(store, labels_spec, ignore)
    labelled = labelled_vectors(store, label_set.labels)
    splits = recorded_splits(store, name, labelled.ids)
    warnings = [] if splits is not None else [f"model {name} records no split (trained by an older pnsfw): "
                                              "every labelled row counts as held out"]
    splits = splits if splits is not None else np.full(len(labelled.ids), NEW, dtype=object)
    rows = np.isin(splits, list(SELECT[split]))
    labels = labelled.labels[rows]
    mapping = label_mapping(labels, clf.classes, clf.nsfw_classes)
    warnings += _warnings(split, name, splits, rows, nsfw_truth(labels, clf.classes, clf.nsfw_classes))
    result: dict[str, Any] = {"model": name, "split": split, "count": int(rows.sum()),
                              "rows_by_split": _counts(splits[rows]), "label_counts": _counts(labels),
                              "label_mapping": mapping, "warnings": warnings, "unknown": len(label_set.unknown),
                              "unknown_examples": label_set.unknown[:5], "ignored": label_set.ignored}
    if rows.any():
        result.update(report(clf, labelled, rows, clf.threshold, plots))
    return result
