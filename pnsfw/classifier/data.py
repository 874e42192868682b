"""Labelled vectors for training and evaluation: classes, NSFW classes, a stratified split."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInput
from ..store import Store

# Used when --nsfw-classes is not given, and to map foreign labels in `evaluate`.
NSFW_NAMES = frozenset({"nsfw", "unsafe", "porn", "hentai", "sexy", "explicit", "nude", "nudity", "sensitive",
                        "gore", "adult", "1", "true"})
SAFE_NAMES = frozenset({"sfw", "safe", "neutral", "drawings", "clean", "0", "false"})
SPLITS = ("train", "val", "test")


@dataclass
class LabelledData:
    ids: np.ndarray  # int64 (n,), sorted
    vectors: np.ndarray  # fp16 (n, dim)
    labels: np.ndarray  # object (n,) label strings


def resolve_classes(labels: dict[int, str], nsfw: "list[str] | None") -> tuple[list[str], list[str]]:
    """Sorted classes and the NSFW ones; at least one safe and one NSFW class."""
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise BadInput(f"only one class found ({classes[0]!r}, {len(labels)} images): training needs at least "
                       "two labels, e.g. sfw/ and nsfw/ folders")
    if nsfw:
        missing = [c for c in nsfw if c not in classes]
        if missing:
            raise BadInput(f"--nsfw-classes names {', '.join(missing)}, not among the labels {', '.join(classes)}")
        chosen = [c for c in classes if c in nsfw]
    else:
        chosen = [c for c in classes if c.lower() in NSFW_NAMES]
        if not chosen:
            raise BadInput(f"cannot tell which of the labels {', '.join(classes)} are NSFW; "
                           "pass --nsfw-classes a,b")
    if len(chosen) == len(classes):
        raise BadInput(f"every label ({', '.join(classes)}) is NSFW; at least one safe class is needed")
    return classes, chosen


def labelled_vectors(store: Store, labels: dict[int, str]) -> LabelledData:
    """The store's vectors of the labelled ids, in id order."""
    wanted = np.fromiter(labels.keys(), dtype=np.int64, count=len(labels))
    wanted.sort()
    id_parts, vec_parts = [], []
    for ids, vectors in store.iter_vectors():
        keep = np.isin(ids, wanted, assume_unique=True)
        if keep.any():
            id_parts.append(ids[keep])
            vec_parts.append(vectors[keep])
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    vectors = np.concatenate(vec_parts)[order] if vec_parts else np.zeros((0, store.dim), np.float16)
    ids = ids[order]
    return LabelledData(ids, vectors, np.array([labels[int(i)] for i in ids], dtype=object))


def stratified_split(labels: np.ndarray, val_ratio: float, test_ratio: float, seed: int) -> np.ndarray:
    """A split name per row, per class in seeded random order; train keeps at least one row per class."""
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise BadInput("--val-ratio and --test-ratio must be in [0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for label in sorted(set(labels.tolist())):
        rows = rng.permutation(np.nonzero(labels == label)[0])
        n_test = min(int(round(len(rows) * test_ratio)), max(len(rows) - 1, 0))
        n_val = min(int(round(len(rows) * val_ratio)), max(len(rows) - 1 - n_test, 0))
        split[rows[:n_test]] = "test"
        split[rows[n_test:n_test + n_val]] = "val"
    return split


def label_mapping(labels: "Iterable[str]", classes: list[str], nsfw: list[str]) -> dict[str, dict[str, Any]]:
    """Each distinct label -> {"nsfw": bool, "via": "class" | "name"}: a class of the model, or a label outside
    them read by its common name (unsafe, porn, safe, ...); BadInput names labels that are neither."""
    mapping: dict[str, dict[str, Any]] = {}
    unknown = set()
    for label in sorted(set(map(str, labels))):
        if label in classes:
            mapping[label] = {"nsfw": label in nsfw, "via": "class"}
        elif label.lower() in NSFW_NAMES | SAFE_NAMES:
            mapping[label] = {"nsfw": label.lower() in NSFW_NAMES, "via": "name"}
        else:
            unknown.add(label)
    if unknown:
        raise BadInput(f"labels {', '.join(sorted(unknown)[:5])} are neither classes of the model "
                       f"({', '.join(classes)}) nor a known safe/NSFW name")
    return mapping


def nsfw_truth(labels: np.ndarray, classes: list[str], nsfw: list[str]) -> np.ndarray:
    """True where a label is NSFW; labels outside the model's classes are read by common names."""
    mapping = label_mapping(labels, classes, nsfw)
    return np.array([mapping[str(label)]["nsfw"] for label in labels], dtype=bool)
