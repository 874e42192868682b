"""Metrics of an NSFW score against labels: PR/ROC AUC, thresholds, confusion matrices, plots."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput

TABLE_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def _at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = p >= threshold
    tp = int(np.sum(predicted & y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    tn = int(np.sum(~predicted & ~y))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall,
            "fpr": fp / (fp + tn) if fp + tn else 0.0, "f1": 2 * precision * recall / (precision + recall)
            if precision + recall else 0.0, "accuracy": (tp + tn) / len(y) if len(y) else 0.0,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def precision_at_recall(y: np.ndarray, p: np.ndarray, recall: float) -> float:
    """The best precision among thresholds that keep at least `recall`."""
    from sklearn.metrics import precision_recall_curve

    precisions, recalls, _ = precision_recall_curve(y, p)
    ok = recalls >= recall
    return float(precisions[ok].max()) if ok.any() else 0.0


def _pick_precision(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The lowest threshold whose precision reaches target (most recall at that precision)."""
    from sklearn.metrics import precision_recall_curve

    precisions, _, thresholds = precision_recall_curve(y, p)
    ok = np.nonzero(precisions[:-1] >= target)[0]
    return float(thresholds[ok[0]]) if len(ok) else float(thresholds[-1]) if len(thresholds) else 0.5


def _pick_recall(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose recall still reaches target (most precision at that recall)."""
    from sklearn.metrics import precision_recall_curve

    _, recalls, thresholds = precision_recall_curve(y, p)
    ok = np.nonzero(recalls[:-1] >= target)[0]
    return float(thresholds[ok[-1]]) if len(ok) else float(thresholds[0]) if len(thresholds) else 0.5


THRESHOLD_RULES: dict[str, Callable[[np.ndarray, np.ndarray, float], float]] = {
    "precision": _pick_precision, "recall": _pick_recall}


def parse_threshold_rule(spec: "str | None") -> "tuple[str, float] | None":
    """`precision=0.95` / `recall=0.9` -> (metric, target); None keeps 0.5."""
    if not spec:
        return None
    metric, _, value = spec.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if metric.strip() not in THRESHOLD_RULES or not 0 < target <= 1:
        raise BadInput(f"--threshold-for {spec!r}: use precision=T or recall=T with 0 < T <= 1")
    return metric.strip(), target


def pick_threshold(y: np.ndarray, p: np.ndarray, rule: "tuple[str, float] | None") -> float:
    if rule is None:
        return 0.5
    return THRESHOLD_RULES[rule[0]](np.asarray(y, bool), np.asarray(p), rule[1])


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """y: True for NSFW; p: p_nsfw."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = np.asarray(y, bool), np.asarray(p, np.float64)
    both = 0 < y.sum() < len(y)
    at = _at_threshold(y, p, threshold)
    return {
        "count": int(len(y)), "positives": int(y.sum()),
        "pr_auc": float(average_precision_score(y, p)) if both else None,
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "precision_at_recall_0.9": precision_at_recall(y, p, 0.9) if both else None,
        **{k: at[k] for k in ("threshold", "accuracy", "precision", "recall", "f1", "fpr")},
        "confusion": {"tp": at["tp"], "fp": at["fp"], "fn": at["fn"], "tn": at["tn"]},
        "threshold_table": [{k: round(v, 4) if isinstance(v, float) else v for k, v in _at_threshold(y, p, t).items()}
                            for t in TABLE_THRESHOLDS],
    }


def class_confusion(labels: list[str], predicted: list[str], classes: list[str]) -> dict[str, Any]:
    """Multi-class confusion matrix (rows: true class, columns: predicted class)."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predicted, labels=classes)
    return {"classes": classes, "matrix": matrix.tolist(),
            "accuracy": float(np.trace(matrix) / matrix.sum()) if matrix.sum() else 0.0}


def save_plots(y: np.ndarray, p: np.ndarray, folder: Path, prefix: str = "") -> list[str]:
    """PR and ROC curves as PNG files; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(y, bool)
    if not 0 < y.sum() < len(y):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    precision, recall, _ = precision_recall_curve(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    curves = {"pr": (recall, precision, "recall", "precision"), "roc": (fpr, tpr, "false positive rate", "recall")}
    written = []
    for kind, (xs, ys, xlabel, ylabel) in curves.items():
        fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
        ax.plot(xs, ys)
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=f"{kind.upper()} curve")
        ax.grid(alpha=0.3)
        path = folder / f"{prefix}{kind}.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    return written
