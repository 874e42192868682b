"""Metrics of an NSFW score against labels: PR/ROC AUC, thresholds and how they are chosen, confusion matrices."""

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import BadInput

TABLE_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
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


def _pick_precision(y: np.ndarray, p: np.ndarray, target: float) -> tuple[float, bool]:
    """The lowest threshold whose precision reaches target (most recall at that precision); when none does,
    the lowest one of the best precision there is."""
    from sklearn.metrics import precision_recall_curve

    precisions, _, thresholds = precision_recall_curve(y, p)
    ok = np.nonzero(precisions[:-1] >= target)[0]
    if len(ok):
        return float(thresholds[ok[0]]), True
    return float(thresholds[int(np.argmax(precisions[:-1]))]), False


def _pick_recall(y: np.ndarray, p: np.ndarray, target: float) -> tuple[float, bool]:
    """The highest threshold whose recall still reaches target (most precision at that recall)."""
    from sklearn.metrics import precision_recall_curve

    _, recalls, thresholds = precision_recall_curve(y, p)
    ok = np.nonzero(recalls[:-1] >= target)[0]  # never empty: the lowest threshold keeps every positive
    return (float(thresholds[ok[-1]]), True) if len(ok) else (float(thresholds[0]), False)


THRESHOLD_RULES: dict[str, Callable[[np.ndarray, np.ndarray, float], tuple[float, bool]]] = {
    "precision": _pick_precision, "recall": _pick_recall}
DEFAULT_THRESHOLD = 0.5


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


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: "tuple[str, float] | None", on: str) -> dict[str, Any]:
    """The threshold of `rule` on (y, p), rows of the `on` split, and the precision/recall it reaches there:
    {rule, target, on, rows, threshold, met, reached: {precision, recall}, note}. met is False (and note says
    why) when the target cannot be reached, or the rows hold one class and 0.5 is kept."""
    y, p = np.asarray(y, bool), np.asarray(p)
    threshold, met, note = DEFAULT_THRESHOLD, True, ""
    if rule is not None and not 0 < y.sum() < len(y):
        met, note = False, (f"cannot pick a threshold for {rule[0]}={rule[1]:g}: the {on} split holds "
                            f"{'no labelled rows' if not len(y) else 'one class only'}; kept {DEFAULT_THRESHOLD}")
    elif rule is not None:
        threshold, met = THRESHOLD_RULES[rule[0]](y, p, rule[1])
    at = at_threshold(y, p, threshold)
    reached = {"precision": at["precision"], "recall": at["recall"]}
    if rule is not None and not met and not note:
        note = (f"{rule[0]} {rule[1]:g} cannot be reached on the {on} split ({len(y)} rows): the best is "
                f"{reached[rule[0]]:.4f}, at threshold {threshold:.4f}")
    return {"rule": rule[0] if rule else None, "target": rule[1] if rule else None, "on": on, "rows": int(len(y)),
            "threshold": threshold, "met": met, "reached": reached, "note": note}


def reached_on(metrics: dict[str, Any], split: str, choice: dict[str, Any]) -> dict[str, Any]:
    """What the chosen threshold reaches on another split's metrics (met: the target holds there too)."""
    out = {"split": split, "rows": metrics["count"], "precision": metrics["precision"], "recall": metrics["recall"]}
    out["met"] = None if choice["rule"] is None else bool(metrics[choice["rule"]] >= choice["target"])
    return out


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """y: True for NSFW; p: p_nsfw."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = np.asarray(y, bool), np.asarray(p, np.float64)
    both = 0 < y.sum() < len(y)
    at = at_threshold(y, p, threshold)
    return {
        "count": int(len(y)), "positives": int(y.sum()),
        "pr_auc": float(average_precision_score(y, p)) if both else None,
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "precision_at_recall_0.9": precision_at_recall(y, p, 0.9) if both else None,
        **{k: at[k] for k in ("threshold", "accuracy", "precision", "recall", "f1", "fpr")},
        "confusion": {"tp": at["tp"], "fp": at["fp"], "fn": at["fn"], "tn": at["tn"]},
        "threshold_table": [{k: round(v, 4) if isinstance(v, float) else v for k, v in at_threshold(y, p, t).items()}
                            for t in TABLE_THRESHOLDS],
    }


def class_confusion(labels: list[str], predicted: list[str], classes: list[str]) -> dict[str, Any]:
    """Multi-class confusion matrix (rows: true class, columns: predicted class)."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(labels, predicted, labels=classes)
    return {"classes": classes, "matrix": matrix.tolist(),
            "accuracy": float(np.trace(matrix) / matrix.sum()) if matrix.sum() else 0.0}
