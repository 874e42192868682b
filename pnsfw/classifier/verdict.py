"""The one verdict shape: what /v1/score, /v1/search, /v1/explain, `predict --json` and `explain --json` return."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .model import Classifier

FIELDS = ("model", "p_nsfw", "threshold", "nsfw", "label", "probabilities")


@dataclass(frozen=True)
class Verdict:
    """A classifier's call on one vector: p_nsfw against the threshold, the most probable class, every class."""

    model: str
    p_nsfw: float
    threshold: float
    nsfw: bool  # p_nsfw >= threshold
    label: str  # the most probable class
    probabilities: dict[str, float]  # class -> probability, in the model's class order

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


def verdicts(clf: "Classifier", vectors: np.ndarray, threshold: "float | None" = None) -> list[Verdict]:
    """One Verdict per row of vectors (n, dim); `threshold` overrides the model's own."""
    out = clf.outputs(np.asarray(vectors, np.float32))
    probs = clf.to_probabilities(out).astype(np.float64)
    p_nsfw = clf.to_p_nsfw(out).astype(np.float64).tolist()
    cut = float(clf.threshold if threshold is None else threshold)
    labels = [clf.classes[i] for i in probs.argmax(axis=1).tolist()] if len(probs) else []
    return [Verdict(clf.name, p, cut, p >= cut, label, dict(zip(clf.classes, row)))
            for p, label, row in zip(p_nsfw, labels, probs.tolist())]


def verdict_dicts(clf: "Classifier", vectors: np.ndarray, threshold: "float | None" = None) -> list[dict[str, Any]]:
    """verdicts() as JSON-ready dicts."""
    return [v.as_dict() for v in verdicts(clf, vectors, threshold)]
