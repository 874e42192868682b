"""A retrain beside the model it replaces: both models' metrics on the new test split, and verdicts changed."""

from typing import Any

import numpy as np

from ..errors import PnsfwError
from ..store import Store
from .model import Classifier, load_classifier

DELTA_METRICS = ("pr_auc", "roc_auc", "precision_at_recall_0.9", "accuracy", "precision", "recall", "f1", "fpr")


def previous_model(store: Store, name: str) -> Classifier | None:
    """The model NAME a train is about to replace (None when there is none, or it is of another space)."""
    try:
        previous = load_classifier(store, name)
    except PnsfwError:
        return None
    return previous if previous.space == store.space else None


def delta_table(previous: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """[{metric, previous, new, delta}] of the headline metrics (delta None where one side has no value)."""
    rows = []
    for key in DELTA_METRICS:
        old, now = previous.get(key), new.get(key)
        delta = None if old is None or now is None else round(float(now) - float(old), 6)
        rows.append({"metric": key, "previous": old, "new": now, "delta": delta})
    return rows


def verdicts_changed(store: Store, previous: Classifier, new: Classifier, threshold: float) -> dict[str, int]:
    """How many stored items the new model (at `threshold`) calls otherwise than the previous one."""
    compared = to_nsfw = to_sfw = 0
    for _, vectors in store.iter_vectors():
        x = vectors.astype(np.float32)
        old = previous.p_nsfw(x) >= previous.threshold
        now = new.p_nsfw(x) >= threshold
        compared += len(x)
        to_nsfw += int(np.sum(now & ~old))
        to_sfw += int(np.sum(old & ~now))
    return {"compared": compared, "changed": to_nsfw + to_sfw, "to_nsfw": to_nsfw, "to_sfw": to_sfw}


def compare_with_previous(store: Store, previous: Classifier | None, new: Classifier, threshold: float,
                          new_metrics: dict[str, Any], evaluate: Any) -> dict[str, Any] | None:
    """What `train` records as `retrain`: the replaced model's metrics (as saved, and re-measured on the new
    model's evaluation rows by `evaluate(previous)`), the delta table, and the verdicts that changed."""
    if previous is None:
        return None
    try:
        on_split, basis = evaluate(previous), "the new model's evaluation rows"
    except PnsfwError:  # labels the previous model has no class for: compare with what it saved instead
        on_split, basis = next(iter((previous.meta.get("metrics") or {}).values()), {}), "its own saved metrics"
    return {"previous": {"created": previous.meta.get("created"), "threshold": previous.threshold,
                         "classes": previous.classes, "labels": (previous.meta.get("data") or {}).get("labels"),
                         "metrics_saved": previous.meta.get("metrics"), "on_this_split": on_split},
            "delta": delta_table(on_split, new_metrics), "delta_basis": basis,
            "verdicts": verdicts_changed(store, previous, new, threshold)}
