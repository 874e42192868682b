"""Format 1 stores (one `manifest.json`, flat model files, `index/faiss.index`): read as is, migrated on write.

The migration copies every multi-file artefact into its v2 generation folder, commits
`_manifest/0000000001.json` put-if-absent (the moment the store becomes v2), and only then deletes the v1
files. A crash before the commit leaves a v1 store (the copies are orphans); after it, a v2 store whose
leftover v1 files the next writer deletes. Ids, rows and shard files stay as they are.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..errors import StoreError
from . import hooks
from .records import Generation, Manifest, Part, ScoreState, Shard, Space
from .store import LEGACY_MANIFEST, MANIFEST_DIR, Store, writer_token

log = logging.getLogger("pnsfw.store")
MODEL_SUFFIXES = (".keras", ".json", ".labels.parquet", ".plots", ".logs", ".onnx", ".weights.npz", ".npz")
LEGACY_INDEX = ("index/faiss.index", "index/index.json")


def read_v1(store: Store, text: str) -> Manifest:
    """manifest.json -> the typed manifest, with the v1 index and models as in-place generations."""
    where = store.fs.url(LEGACY_MANIFEST)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"cannot read {where}: {exc}; run `pnsfw repair --store {store.root}`") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
        raise StoreError(f"cannot read {where}: not a pnsfw manifest (no shard list); "
                         f"run `pnsfw repair --store {store.root}`")
    if data.get("format") != 1:
        raise StoreError(f"{where} has format {data.get('format')!r}; this pnsfw reads formats 1 and 2")
    try:
        space = Space(data["encoder"], data["projection"]) if data.get("projection") else None
        shard_list = [Shard(s["name"], int(s["rows"]), int(s["min_id"]), int(s["max_id"]), s["sha256"],
                            int(s["bytes"]), float(s.get("committed", 0))) for s in data["shards"]]
        errors = [Part(e["name"], int(e["rows"]), e["sha256"], int(e["bytes"]), float(e.get("committed", 0)))
                  for e in data.get("errors", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"cannot read {where}: malformed entry ({exc}); "
                         f"run `pnsfw repair --store {store.root}`") from None
    index = Generation("index") if all(store.fs.exists(p) for p in LEGACY_INDEX) else None
    return Manifest(format=1, created=float(data.get("created", 0)), space=space, next_id=int(data["next_id"]),
                    shards=shard_list, errors=errors, index=index, models={n: Generation("models") for n in
                                                                          legacy_models(store)})


def legacy_models(store: Store) -> list[str]:
    return sorted(e.name[:-len(".keras")] for e in store.fs.list("models") if e.name.endswith(".keras")
                  and not e.is_dir)


def legacy_score_state(store: Store, name: str) -> ScoreState | None:
    """scores/NAME/progress.json of a v1 store."""
    rel = f"scores/{name}/progress.json"
    try:
        data = json.loads(store.fs.read_bytes(rel))
    except (FileNotFoundError, ValueError):
        return None
    return ScoreState.from_json(data, store.fs.url(rel))


def _copy_model(store: Store, name: str) -> Generation:
    folder = f"models/{name}/{writer_token()}"
    for entry in store.fs.list("models"):
        if entry.name.startswith(name + ".") and entry.name[len(name):] in MODEL_SUFFIXES:
            store.fs.copy(f"models/{entry.name}", f"{folder}/{entry.name}")
    return Generation(folder, store.manifest.created)


def _copy_index(store: Store) -> Generation:
    folder = f"index/{writer_token()}"
    for rel in LEGACY_INDEX:
        store.fs.copy(rel, f"{folder}/{rel.split('/')[-1]}")
    meta = json.loads(store.fs.read_bytes(LEGACY_INDEX[1]))
    return Generation(folder, float(meta.get("updated", 0)), _index_info(meta))


def _index_info(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("kind", "factory", "ntotal", "space")} | {"shards": len(meta.get("shards", []))}


def _migrate_scores(store: Store) -> None:
    for entry in store.fs.list("scores"):
        state = legacy_score_state(store, entry.name) if entry.is_dir else None
        scores = store.scores(entry.name)
        if state is not None and not scores.log.versions():
            scores.log.put(1, state.to_json())


def migrate(store: Store) -> bool:
    """v1 -> v2 in place; False when the store was not v1 (or another process migrated it first)."""
    if not store.legacy:
        return False
    manifest = store.manifest.copy()
    manifest.format = 2
    if manifest.index is not None:
        manifest.index = _copy_index(store)
    manifest.models = {name: _copy_model(store, name) for name in manifest.models}
    _migrate_scores(store)
    hooks.pause("migrate:copied")
    from .checkpoint import put_whole
    from .log import VersionLog

    won = put_whole(store.fs, VersionLog(store.fs, MANIFEST_DIR), 1, manifest, writer_token())
    store.refresh()
    if won:
        log.info("migrated store %s from format 1 to 2", store.root)
        remove_legacy(store)
    return won


def remove_legacy(store: Store) -> None:
    """Delete the v1 files of a store that is v2 now (the manifest.json last)."""
    if store.legacy or not store.fs.exists(LEGACY_MANIFEST):
        return
    for name in legacy_models(store):
        for entry in store.fs.list("models"):
            if entry.name.startswith(name + ".") and entry.name[len(name):] in MODEL_SUFFIXES:
                store.fs.delete(f"models/{entry.name}")
    for rel in LEGACY_INDEX:
        store.fs.delete(rel)
    for entry in store.fs.list("scores"):
        for leftover in ("progress.json", "LOCK"):
            store.fs.delete(f"scores/{entry.name}/{leftover}")
    hooks.pause("migrate:cleaned")
    store.fs.delete(LEGACY_MANIFEST)
