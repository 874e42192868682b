"""`pnsfw predict`: score image files, folders or .npy embeddings without adding them to the store."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..store import Store
from ..userio import load_vectors
from .model import DEFAULT_NAME, Classifier, load_classifier


class FileEmbedder(Protocol):
    """Image files -> vectors in the store's space (cli hands in pnsfw.indexer.embedding.EmbeddingService)."""

    def embed_files(self, paths: list[str]) -> tuple[np.ndarray, list["str | None"]]:
        """(vectors, per-file error or None)."""


OpenEmbedder = Callable[[Store], FileEmbedder]


@dataclass
class PredictOptions:
    name: str = DEFAULT_NAME
    threshold: float | None = None
    batch_size: int = 64


def _npy_rows(path: str, dim: int, store: Store) -> tuple[list[str], np.ndarray]:
    """Rows of the store's space, or raw CLIP features of the encoder's width put through its projection."""
    projection = store.projection()
    array = load_vectors(path, dim, projection.width)
    if array.shape[1] != dim or projection.kind == "none":
        array = projection.apply(array)
    return ([path] if len(array) == 1 else [f"{path}[{i}]" for i in range(len(array))]), array


def _encode_images(store: Store, paths: list[str], options: PredictOptions,
                   open_embedder: OpenEmbedder) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Image path -> vector in the store's space, and path -> error for files that could not be used."""
    service = open_embedder(store)
    vectors, errors = {}, {}
    for start in range(0, len(paths), options.batch_size):
        batch = paths[start:start + options.batch_size]
        embedded, problems = service.embed_files(batch)
        for path, vector, problem in zip(batch, embedded, problems):
            if problem is None:
                vectors[path] = vector
            else:
                errors[path] = problem
    return vectors, errors


def _verdicts(clf: Classifier, names: list[str], vectors: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    return [{"path": name, "verdict": verdict} for name, verdict in zip(names, clf.verdicts(vectors, threshold))]


def predict_paths(store_root: "str | Path", paths: list[str], open_embedder: OpenEmbedder,
                  options: PredictOptions | None = None) -> list[dict[str, Any]]:
    """One result per image or embedding row of PATHS (files: .npy or images, encoded by open_embedder(store)
    when there are any): {path, verdict} (the one verdict shape) or {path, error}."""
    options = options or PredictOptions()
    store = Store.open(store_root)
    clf = load_classifier(store, options.name)
    threshold = clf.threshold if options.threshold is None else float(options.threshold)
    npy = {p: _npy_rows(p, clf.dim, store) for p in paths if p.lower().endswith(".npy")}
    images = [p for p in paths if p not in npy]
    vectors, errors = _encode_images(store, images, options, open_embedder) if images else ({}, {})
    results = {p: _verdicts(clf, names, array, threshold) for p, (names, array) in npy.items()}
    if vectors:
        found = _verdicts(clf, list(vectors), np.stack(list(vectors.values())), threshold)
        results.update({r["path"]: [r] for r in found})
    results.update({p: [{"path": p, "error": reason}] for p, reason in errors.items()})
    return [r for p in paths for r in results[p]]


def results_table(results: list[dict[str, Any]]) -> Any:
    """predict's results as one flat table (path, model, p_nsfw, threshold, nsfw, label, p_<class>..., error),
    for `--out FILE`."""
    import pyarrow as pa

    classes = next((list(r["verdict"]["probabilities"]) for r in results if "verdict" in r), [])
    rows = []
    for r in results:
        v = r.get("verdict") or {}
        row = {"path": r["path"], **{k: v.get(k) for k in ("model", "p_nsfw", "threshold", "nsfw", "label")}}
        row.update({f"p_{c}": v.get("probabilities", {}).get(c) for c in classes})
        rows.append(dict(row, error=r.get("error")))
    types = {"path": pa.string(), "model": pa.string(), "p_nsfw": pa.float32(), "threshold": pa.float32(),
             "nsfw": pa.bool_(), "label": pa.string(), **{f"p_{c}": pa.float32() for c in classes},
             "error": pa.string()}
    return pa.Table.from_pylist(rows, schema=pa.schema(list(types.items())))
