"""Keeping a store healthy: the orphan sweep, `verify`, `repair`, `info` and `migrate`."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import StoreError
from . import shards
from .checkpoint import CHECKPOINT_DIR, put_whole, read_manifest, stale_checkpoints
from .fs import Entry, open_binary
from .log import VersionLog
from .records import Manifest, Part, ScoreState, Shard, Space
from .store import _HOST, LEGACY_MANIFEST, MANIFEST_DIR, NORM_TOLERANCE, Store, writer_token

log = logging.getLogger("pnsfw.store")
GRACE_S = 3600.0  # an unreferenced file of a writer we cannot see (another host) is dead after this long
_TOKEN = re.compile(r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{4}")
_TMP = re.compile(r"\.tmp-(?P<pid>\d+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(store: Store, entry: Entry, now: float) -> bool:
    """Provably no live writer will commit this file: its writer (this host) is dead, or it is very old."""
    if now - entry.mtime > GRACE_S:
        return True
    tmp, token = _TMP.search(entry.name), _TOKEN.search(entry.name)
    if tmp is not None and store.fs.local:
        return not _pid_alive(int(tmp.group("pid")))
    if token is not None and token.group("host") == _HOST:
        return not _pid_alive(int(token.group("pid")))
    return False


def _referenced(store: Store, versions: int = 3) -> set[str]:
    """Paths the newest few manifest versions list (a reader may still be on one of them)."""
    manifests = [store.manifest]
    logv = VersionLog(store.fs, MANIFEST_DIR)
    for version in logv.versions()[-versions:]:
        try:
            manifests.append(read_manifest(store.fs, logv.read(version), "", store.root))
        except (ValueError, StoreError, FileNotFoundError):
            continue
    keep: set[str] = set()
    for m in manifests:
        keep.update(f"shards/{s.name}" for s in m.shards)
        keep.update(f"errors/{p.name}" for p in m.errors)
        keep.update(f"labels/{p.name}" for p in m.labels)
        for g in [m.index, *m.models.values()]:
            if g is not None:
                keep.update([g.folder, *g.uses])
    return keep


def remove_orphans(store: Store) -> list[str]:
    """Delete files no manifest lists whose writer is provably dead; returns what was deleted."""
    if store.legacy:
        return []
    from .legacy import remove_legacy

    remove_legacy(store)
    keep, now, removed = _referenced(store), time.time(), []
    folders = ["shards", "errors", "labels", "index", MANIFEST_DIR, ""]
    folders += [f"models/{e.name}" for e in store.fs.list("models") if e.is_dir]
    folders += [f"scores/{e.name}" for e in store.fs.list("scores") if e.is_dir]
    for folder, entries in zip(folders, store.fs.map(store.fs.list, folders)):
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            transient = _TMP.search(entry.name) is not None
            if folder in ("", MANIFEST_DIR) or folder.startswith("scores/"):
                if not transient:
                    continue  # only leftovers of interrupted writes live beside committed files here
            elif rel in keep or (folder == "index" and entry.name in ("faiss.index", "index.json")):
                continue
            if _dead(store, entry, now):
                store.fs.delete(rel)
                removed.append(rel)
    removed += _sweep_checkpoints(store)
    if removed:
        log.info("removed %d leftovers of interrupted writers: %s", len(removed), ", ".join(removed[:5]))
    return removed


def _sweep_checkpoints(store: Store) -> list[str]:
    """Delete manifest checkpoints that no kept version can reference any more."""
    logv = VersionLog(store.fs, MANIFEST_DIR)
    versions = logv.versions()
    if not versions:
        return []
    try:
        oldest = read_manifest(store.fs, logv.read(versions[0]), "", store.root)
    except (ValueError, StoreError, FileNotFoundError):
        return []  # pruned or damaged meanwhile: sweep next time
    stale = stale_checkpoints(store.fs, oldest, versions[0])
    for rel in stale:
        store.fs.delete(rel)
    return stale


# ---- verify
def check_shard(store: Store, shard: Shard, checksum: bool = True) -> str | None:
    """None if the shard is intact, else what is wrong with it (one line)."""
    rel = f"shards/{shard.name}"
    try:
        size = store.fs.size(rel)
    except FileNotFoundError:
        return f"shard {shard.name}: missing"
    if size != shard.bytes:
        return f"shard {shard.name}: {size} bytes, the manifest says {shard.bytes}"
    if checksum and _sha256(store, rel) != shard.sha256:
        return f"shard {shard.name}: sha256 differs from the manifest (the file changed after its commit)"
    return _check_content(store, rel, shard.name, shard.rows, shard.min_id, shard.max_id)


def _sha256(store: Store, rel: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open_binary(store.fs, rel) as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _check_content(store: Store, rel: str, name: str, rows: int | None, lo: int | None, hi: int | None) -> str | None:
    """Footer, row count, id range and vector norms of a shard file."""
    try:
        table = shards.read_table(store.fs.open_input(rel), ["id", "embedding"])
    except (pa.ArrowException, OSError) as exc:
        return f"shard {name}: unreadable ({str(exc).splitlines()[0][:100]})"
    ids = table.column("id").to_numpy()
    if rows is not None and len(ids) != rows:
        return f"shard {name}: {len(ids)} rows, the manifest says {rows}"
    if lo is not None and len(ids) and (int(ids[0]) != lo or int(ids[-1]) != hi):
        return f"shard {name}: ids {ids[0]}..{ids[-1]}, the manifest says {lo}..{hi}"
    dim = table.schema.field("embedding").type.byte_width // 2
    vectors = shards.embedding_matrix(table.column("embedding"), dim).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)
    if bad.any():
        return f"shard {name}: {int(bad.sum())} vectors are not unit vectors (norm {float(norms[bad][0]):.4g})"
    return None


def check_shards(store: Store) -> None:
    """Checksums of every shard (before train and reindex); StoreError naming the first damaged one."""
    for shard in store.shards:
        problem = check_shard(store, shard)
        if problem is not None:
            raise StoreError(f"{problem}; run `pnsfw repair --store {store.root}`")


@dataclass
class VerifyReport:
    checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(root: str) -> VerifyReport:
    """`pnsfw verify`: sizes, checksums, footers, id ranges and norms of every shard; parts; index; models."""
    store = Store.open(root)
    report = VerifyReport()
    for shard in store.shards:
        report.problems.append(check_shard(store, shard) or "")
    for folder, parts in (("errors", store.manifest.errors), ("labels", store.manifest.labels)):
        for part in parts:
            report.problems.append(_check_part(store, folder, part))
    report.problems.append(_check_index(store))
    for name in store.manifest.models:
        report.problems.append(_check_model(store, name))
    report.problems = [p for p in report.problems if p]
    report.checked = {"shards": len(store.shards), "errors": len(store.manifest.errors),
                      "labels": len(store.manifest.labels), "models": len(store.manifest.models),
                      "index": int(store.manifest.index is not None)}
    return report


def _check_part(store: Store, folder: str, part: Part) -> str:
    rel = f"{folder}/{part.name}"
    try:
        if _sha256(store, rel) != part.sha256:
            return f"{folder} part {part.name}: sha256 differs from the manifest"
        shards.read_table(store.fs.open_input(rel))
    except FileNotFoundError:
        return f"{folder} part {part.name}: missing"
    except (pa.ArrowException, OSError) as exc:
        return f"{folder} part {part.name}: unreadable ({exc})"
    return ""


def _check_index(store: Store) -> str:
    """The current index generation: its index.json, every segment file (and trained part) it references, with
    the size it was committed with, and the shards it covers (each once, all in the store)."""
    from .artifacts import index_files, index_meta

    gen = store.manifest.index
    if gen is None:
        return ""
    try:
        meta = index_meta(store) or {}
    except StoreError as exc:
        return str(exc).split("; run")[0]
    for entry in index_files(store, meta):
        rel = f"{entry['folder']}/{entry['file']}"
        if not store.fs.exists(rel):
            return f"index {gen.folder}: {rel} is missing"
        if entry.get("bytes") is not None and store.fs.size(rel) != entry["bytes"]:
            return f"index {gen.folder}: {rel} is {store.fs.size(rel)} bytes, index.json says {entry['bytes']}"
    names = {s.name for s in store.shards}
    covered = meta.get("shards", [])
    missing = [n for n in covered if n not in names]
    if missing:
        return f"index {gen.folder}: covers shards the store does not list ({missing[0]})"
    if meta.get("segments") and sorted(n for s in meta["segments"] for n in s["shards"]) != sorted(covered):
        return f"index {gen.folder}: its segments do not cover each of its shards exactly once"
    return ""


def _check_model(store: Store, name: str) -> str:
    gen = store.manifest.models[name]
    for suffix in (".keras", ".json"):
        if not store.fs.exists(f"{gen.folder}/{name}{suffix}"):
            return f"model {name}: {gen.folder}/{name}{suffix} is missing"
    return ""


# ---- repair
@dataclass
class RepairReport:
    kept: int = 0
    rows: int = 0
    dropped: list[str] = field(default_factory=list)
    index: str = "kept"


def _base_manifest(store_root: str, fs: Any) -> Manifest | None:
    """The newest readable manifest (v2 version or v1 file), or None when none is readable."""
    logv = VersionLog(fs, MANIFEST_DIR)
    for version in reversed(logv.versions()):
        try:
            return read_manifest(fs, logv.read(version), "", store_root)
        except (ValueError, StoreError, FileNotFoundError):
            continue
    try:
        from .legacy import read_v1

        return read_v1(Store(store_root, fs, load=False), fs.read_bytes(LEGACY_MANIFEST).decode())
    except (FileNotFoundError, StoreError, UnicodeDecodeError):
        return None


def _scan_shards(store: Store, base: Manifest | None, report: RepairReport) -> list[Shard]:
    """The intact shards: the base manifest's (checked), or every intact file when no manifest is left."""
    if base is not None:
        kept = []
        for shard in base.shards:
            problem = check_shard(store, shard)
            if problem is None:
                kept.append(shard)
            else:
                report.dropped.append(problem)
        return kept
    found = []
    for entry in store.fs.list("shards"):
        if not entry.name.endswith(".parquet") or entry.name.startswith("."):
            continue
        rel = f"shards/{entry.name}"
        problem = _check_content(store, rel, entry.name, None, None, None)
        if problem is not None:
            report.dropped.append(problem)
            continue
        ids = shards.read_table(store.fs.open_input(rel), ["id"]).column("id").to_numpy()
        if len(ids):
            found.append(Shard(entry.name, len(ids), int(ids[0]), int(ids[-1]), _sha256(store, rel), entry.size,
                               entry.mtime))
    kept, next_id = [], 0
    for shard in sorted(found, key=lambda s: (s.min_id, s.name)):
        if shard.min_id < next_id:
            report.dropped.append(f"shard {shard.name}: ids overlap a kept shard (an uncommitted copy)")
            continue
        kept.append(shard)
        next_id = shard.max_id + 1
    return kept


def _recover_space(store: Store, base: Manifest | None, kept: list[Shard]) -> Space:
    if base is not None and base.space is not None:
        return base.space
    for shard in kept:
        meta = shards.parquet_file(store.fs.open_input(f"shards/{shard.name}")).schema_arrow.metadata or {}
        if b"pnsfw.space" in meta:
            return Space(**json.loads(meta[b"pnsfw.space"]))
    for rel in store.fs.walk_files("models"):
        if rel.endswith(".json"):
            try:
                meta = json.loads(store.fs.read_bytes(rel))
                return Space(meta["encoder"], meta["projection"])
            except (ValueError, KeyError, TypeError):
                continue
    raise StoreError(f"cannot recover the embedding space of {store.root}: no readable manifest, shard metadata "
                     "or model metadata records it")


def repair_store(root: str, rebuild_index: Callable[[Store], Any] | None = None) -> RepairReport:
    """`pnsfw repair`: a new manifest version of what is intact; damaged files are left out (and named)."""
    store = Store(root, load=False)
    report = RepairReport()
    base = _base_manifest(store.root, store.fs)
    if base is None and not store.fs.list("shards"):
        raise StoreError(f"nothing to repair at {store.root}: no manifest and no shards")
    store.manifest = base or Manifest()
    kept = _scan_shards(store, base, report)
    manifest = _repaired(store, base, kept, report)
    _commit_repaired(store, manifest)
    _repair_scores(store, report)
    report.kept, report.rows = len(kept), sum(s.rows for s in kept)
    if manifest.index is None and rebuild_index is not None and report.rows:
        rebuild_index(store)
        report.index = "rebuilt"
    return report


def _repaired(store: Store, base: Manifest | None, kept: list[Shard], report: RepairReport) -> Manifest:
    from . import legacy

    m = Manifest(space=_recover_space(store, base, kept), shards=kept)
    m.next_id = max([base.next_id if base else 0] + [s.max_id + 1 for s in kept])
    if base is not None:
        m.created = base.created
        for folder, parts, out in (("errors", base.errors, m.errors), ("labels", base.labels, m.labels)):
            for part in parts:
                problem = _check_part(store, folder, part)
                (report.dropped.append(problem) if problem else out.append(part))
        store.manifest = base
        m.models = {}
        for name, gen in base.models.items():
            problem = _check_model(store, name)
            if problem:
                report.dropped.append(problem)
            else:
                m.models[name] = legacy._copy_model(store, name) if gen.folder == "models" else gen
        store.manifest = m
        m.index = base.index
        problem = _check_index(store) if base.index is not None else "index: none"
        if base.index is not None and problem:
            report.dropped.append(problem)
        if problem:
            m.index, report.index = None, "dropped"
        elif m.index is not None and m.index.folder == "index":
            m.index = legacy._copy_index(store)
    else:
        report.index = "dropped"
    return m


def _commit_repaired(store: Store, manifest: Manifest) -> None:
    logv = VersionLog(store.fs, MANIFEST_DIR)
    for _ in range(20):
        versions = logv.versions()
        if put_whole(store.fs, logv, (versions[-1] if versions else 0) + 1, manifest, writer_token()):
            break
    else:
        raise StoreError(f"could not commit the repaired manifest of {store.root}: other writers kept winning")
    if not versions:  # the log was lost: no version is left to reference an older checkpoint
        ours = manifest.checkpoint.file if manifest.checkpoint is not None else None
        for entry in store.fs.list(CHECKPOINT_DIR):
            if not entry.is_dir and entry.name != ours:
                store.fs.delete(f"{CHECKPOINT_DIR}/{entry.name}")
    from .legacy import remove_legacy

    store.refresh()
    remove_legacy(store)


def _repair_scores(store: Store, report: RepairReport) -> None:
    names = {s.name: s.sha256 for s in store.shards}
    for entry in store.fs.list("scores"):
        if not entry.is_dir:
            continue
        scores = store.scores(entry.name)
        try:
            state = scores.state()
        except StoreError:
            state = None
        if state is None:
            continue
        bad = [n for n in state.shards if n not in names or not _score_part_ok(scores, n)]
        if bad:
            report.dropped.append(f"scores {entry.name}: {len(bad)} parts ({bad[0]}, ...) to be rescored")
            scores.commit(functools.partial(_without, drop=set(bad)))


def _without(state: ScoreState | None, drop: set[str]) -> ScoreState | None:
    if state is None:
        return None
    state.shards = {k: v for k, v in state.shards.items() if k not in drop}
    return state


def _score_part_ok(scores: Any, name: str) -> bool:
    try:
        shards.read_table(scores.part_source(name), ["id"])
        return True
    except (pa.ArrowException, OSError):
        return False


# ---- info and migrate
def store_info(root: str) -> dict[str, Any]:
    """`pnsfw info`: what the store holds, from the manifest (and small metadata files)."""
    from .artifacts import index_meta

    store = Store.open(root)
    m, space = store.manifest, store.manifest.space
    reasons: Counter[str] = Counter()
    for part in m.errors:
        reasons.update(part.reasons or {"(not recorded)": part.rows})
    meta = index_meta(store) if m.index else None
    covered = len(set(meta.get("shards", [])) & {s.name for s in m.shards}) if meta else 0
    return {
        "store": store.root, "format": m.format, "version": store.version, "rows": m.rows, "next_id": m.next_id,
        "shards": len(m.shards), "bytes": sum(s.bytes for s in m.shards),
        "space": None if space is None else {"fingerprint": space.fingerprint, "encoder": space.encoder.get("name"),
                                             "encoder_fingerprint": space.encoder.get("fingerprint"),
                                             "projection": space.projection.get("kind"), "dim": space.dim},
        "errors": {"rows": sum(p.rows for p in m.errors), "by_reason": dict(reasons.most_common())},
        "index": None if meta is None else {"kind": meta.get("kind"), "factory": meta.get("factory"),
                                            "ntotal": meta.get("ntotal"), "shards_covered": covered,
                                            "segments": len(meta.get("segments") or [None]),
                                            "coverage": covered / len(m.shards) if m.shards else 1.0},
        "models": {name: _model_info(store, name) for name in sorted(m.models)},
        "scores": _scores_info(store), "labels": sum(p.rows for p in m.labels),
    }


def _model_info(store: Store, name: str) -> dict[str, Any]:
    gen = store.manifest.models[name]
    try:
        meta = json.loads(store.fs.read_bytes(f"{gen.folder}/{name}.json"))
    except (FileNotFoundError, ValueError):
        return {"generation": gen.folder, "error": "metadata unreadable"}
    return {"generation": gen.folder, "classes": meta.get("classes"), "threshold": meta.get("threshold"),
            "metrics": meta.get("metrics"), "retrain": meta.get("retrain")}


def _scores_info(store: Store) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = {s.name: s.sha256 for s in store.shards}
    for entry in store.fs.list("scores"):
        if entry.is_dir:
            state = store.scores(entry.name).state()
            done = 0 if state is None else sum(names.get(k) == v for k, v in state.shards.items())
            out[entry.name] = {"shards_scored": done, "shards": len(names),
                               "model_fingerprint": None if state is None else state.fingerprint}
    return out


def migrate_store(root: str) -> bool:
    """`pnsfw migrate`: v1 -> v2 in place; False when it already was v2."""
    from .legacy import migrate

    return migrate(Store.open(root))
