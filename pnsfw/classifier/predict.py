"""`pnsfw predict`: score image files, folders or .npy embeddings without adding them to the store."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, SpaceMismatch
from ..store import Store
from .model import DEFAULT_NAME, Classifier, load_classifier


@dataclass
class PredictOptions:
    name: str = DEFAULT_NAME
    clip_model: str | None = None  # default: the encoder recorded in the store's manifest
    device: str = "auto"
    threshold: float | None = None
    batch_size: int = 64


def _expand(inputs: list[str]) -> list[str]:
    """Files as given; folders walked recursively (hidden files skipped), in a stable order."""
    from ..indexer.sources import iter_items

    paths = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            paths += [item.uri for item in iter_items(str(path))]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise BadInput(f"{entry}: no such file or folder")
    if not paths:
        raise BadInput(f"no files found in {', '.join(inputs)}")
    return paths


def _npy_rows(path: str, dim: int) -> tuple[list[str], np.ndarray]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    array = array[None, :] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != dim:
        raise BadInput(f"{path}: expected embeddings of the store's space, shape (n, {dim}), got {array.shape}")
    names = [path] if len(array) == 1 else [f"{path}[{i}]" for i in range(len(array))]
    return names, array.astype(np.float32)


def _encode_images(store: Store, paths: list[str], options: PredictOptions) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Image path -> projected vector, and path -> error for files that could not be used."""
    from ..indexer.encoder import load_encoder
    from ..indexer.reader import process_item
    from ..indexer.sources import Item

    recorded = store.manifest["encoder"]
    encoder = load_encoder(options.clip_model or recorded["name"], options.device)
    if encoder.fingerprint != recorded["fingerprint"]:
        raise SpaceMismatch(f"CLIP model {encoder.name} is not the one store {store.root} was built with "
                            f"({recorded['name']}); pass the right --clip-model")
    projection, vectors, errors = store.projection(), {}, {}
    results = [process_item(Item(p, str(Path(p).parent)), encoder.resolution) for p in paths]
    for result in results:
        if result.pixels is None:
            errors[result.item.uri] = f"{result.reason}: {result.detail}" if result.detail else result.reason
    good = [r for r in results if r.pixels is not None]
    for start in range(0, len(good), options.batch_size):
        batch = good[start:start + options.batch_size]
        features = encoder.encode_pixels(np.stack([r.pixels for r in batch]))
        vectors.update(zip([r.item.uri for r in batch], projection.apply(features)))
    return vectors, errors


def _verdicts(clf: Classifier, names: list[str], vectors: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    return [{"path": name, "verdict": verdict} for name, verdict in zip(names, clf.verdicts(vectors, threshold))]


def predict_paths(store_root: "str | Path", inputs: list[str], options: PredictOptions | None = None) -> list[dict[str, Any]]:
    """One result per image or embedding row: {path, verdict} (the one verdict shape) or {path, error}."""
    options = options or PredictOptions()
    store = Store.open(store_root)
    clf = load_classifier(store, options.name)
    threshold = clf.threshold if options.threshold is None else float(options.threshold)
    paths = _expand(inputs)
    npy = {p: _npy_rows(p, clf.dim) for p in paths if p.lower().endswith(".npy")}
    images = [p for p in paths if p not in npy]
    vectors, errors = _encode_images(store, images, options) if images else ({}, {})
    results = {p: _verdicts(clf, names, array, threshold) for p, (names, array) in npy.items()}
    if vectors:
        results.update({r["path"]: [r] for r in _verdicts(clf, list(vectors), np.stack(list(vectors.values())), threshold)})
    results.update({p: [{"path": p, "error": reason}] for p, reason in errors.items()})
    return [r for p in paths for r in results[p]]
