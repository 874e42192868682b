"""The FAISS index over the store's vectors: inner product on unit vectors, store ids as FAISS ids."""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..store import Store
from ..store.files import atomic_write, atomic_write_json

INDEX_FILE = "faiss.index"
META_FILE = "index.json"


def index_dir(store: Store) -> Path:
    return store.root / "index"


def read_meta(store: Store) -> "dict[str, Any] | None":
    path = index_dir(store) / META_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def _new_flat(dim: int) -> Any:
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _add_shards(index: Any, store: Store, names: list[str]) -> int:
    added = 0
    for ids, vectors in store.iter_vectors([store.root / "shards" / n for n in names]):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        added += len(ids)
    return added


def save_index(store: Store, index: Any, meta: dict[str, Any]) -> None:
    import faiss

    folder = index_dir(store)
    atomic_write(folder / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    atomic_write_json(folder / META_FILE, meta)


def load_index(store: Store) -> tuple[Any, dict[str, Any]]:
    import faiss

    meta = read_meta(store)
    if meta is None:
        raise StoreError(f"store {store.root} has no index (run `pnsfw reindex --store {store.root}`)")
    store.check_space(meta["space"], f"index {index_dir(store)}")
    return faiss.read_index(str(index_dir(store) / INDEX_FILE)), meta


def update_index(store: Store) -> dict[str, Any]:
    """Add shards the index does not cover yet; rebuild if it is missing or from another space."""
    started = time.perf_counter()
    meta = read_meta(store)
    names = [s["name"] for s in store.manifest["shards"]]
    if meta is None or meta.get("space") != store.space or meta.get("kind") != "flat":
        index, covered = _new_flat(store.dim), []
    else:
        index, covered = load_index(store)[0], meta["shards"]
    todo = [n for n in names if n not in set(covered)]
    added = _add_shards(index, store, todo)
    meta = {"kind": "flat", "factory": "IDMap2,Flat", "metric": "inner_product", "space": store.space,
            "dim": store.dim, "ntotal": int(index.ntotal), "shards": covered + todo, "updated": time.time()}
    if todo or not (index_dir(store) / INDEX_FILE).exists():
        save_index(store, index, meta)
    return {"kind": "flat", "ntotal": int(index.ntotal), "added": added,
            "seconds": round(time.perf_counter() - started, 3)}
