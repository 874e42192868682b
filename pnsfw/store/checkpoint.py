"""Manifest checkpoints: commits whose cost does not grow with the shard count (as Delta Lake checkpoints do).

A small store's version file lists every shard, error part and labels part inline (format 2, as before).
Once the lists hold CHECKPOINT_EVERY entries, the committer first writes an immutable checkpoint file
`_manifest/_checkpoints/VVVVVVVVVV-TOKEN.json` with the full lists, then creates version V put-if-absent
(still the one commit point) in format 3: the header (space, next id, index, models), a reference to the
checkpoint (file, entry counts, sha256) and, under `tail`, only the entries added since. Later commits
append to the tail until it is CHECKPOINT_EVERY long again. Opening reads one version file and at most
one checkpoint, whatever the number of commits or shards. A format-3 version has no top-level `shards`
list, so a reader that predates checkpoints refuses it with one line instead of seeing part of the store.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import StoreError
from .fs import FileSystem
from .log import VersionLog
from .records import FORMAT_VERSION, Manifest

CHECKPOINT_EVERY = 1000  # entries a version lists inline before a checkpoint takes them
CHECKPOINT_DIR = "_manifest/_checkpoints"
LISTS = ("shards", "errors", "labels")
FORMAT = 3
_CACHE: OrderedDict[tuple[str, str], dict[str, list[Any]]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


@dataclass
class Checkpoint:
    """A version's reference to the checkpoint holding its first `counts[list]` entries of each list."""

    file: str
    counts: dict[str, int]
    sha256: str
    version: int


def checkpoint_version(name: str) -> int:
    """0000000040-TOKEN.json -> 40 (-1 for other names)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def read_manifest(fs: FileSystem, doc: Any, where: str, root: str) -> Manifest:
    """A version document (format 2 inline, or format 3 with a checkpoint) -> the full manifest."""
    written = doc.get("format") if isinstance(doc, dict) else None
    if isinstance(written, int) and written > FORMAT:
        raise StoreError(f"{where} is store format {written}, written by a newer pnsfw (this one reads formats up "
                         f"to {FORMAT}); upgrade pnsfw to read or write this store")
    if not isinstance(doc, dict) or "checkpoint" not in doc:
        return Manifest.from_json(doc, where, root)
    try:
        ref = Checkpoint(**doc["checkpoint"])
        tail = doc["tail"]
        lists = _read_checkpoint(fs, ref)
        full = dict(doc, **{k: lists[k] + list(tail.get(k, [])) for k in LISTS})
    except (TypeError, KeyError, AttributeError) as exc:
        raise StoreError(f"{where} has a malformed checkpoint reference ({exc}); run `pnsfw repair --store {root}`"
                         ) from None
    full.pop("checkpoint")
    full.pop("tail")
    manifest = Manifest.from_json(full, where, root)
    manifest.checkpoint = ref
    return manifest


def _read_checkpoint(fs: FileSystem, ref: Checkpoint) -> dict[str, list[Any]]:
    """The checkpoint's lists (immutable files: cached per process by name and checksum)."""
    key = (fs.root, ref.file)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    data = fs.read_bytes(f"{CHECKPOINT_DIR}/{ref.file}")  # FileNotFoundError: the caller re-reads the log
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise StoreError(f"checkpoint {fs.url(CHECKPOINT_DIR + '/' + ref.file)} does not match its checksum; "
                         f"run `pnsfw repair --store {fs.root}`")
    lists = json.loads(data)
    if not isinstance(lists, dict) or any(len(lists.get(k, [])) != ref.counts.get(k, 0) for k in LISTS):
        raise StoreError(f"checkpoint {ref.file} of {fs.root} does not hold the entries its version counts; "
                         f"run `pnsfw repair --store {fs.root}`")
    with _CACHE_LOCK:
        _CACHE[key] = lists
        while len(_CACHE) > 4:
            _CACHE.popitem(last=False)
    return lists


def document(fs: FileSystem, new: Manifest, base: Manifest, version: int, token: str) -> tuple[dict[str, Any], str]:
    """The version document for `new` (committed on top of `base` as `version`) and the checkpoint file it
    wrote ("" for none): inline while small, else the base's checkpoint plus a tail, or a fresh checkpoint."""
    ref = _still_valid(new, base)
    if ref is None and sum(len(getattr(new, k)) for k in LISTS) < CHECKPOINT_EVERY:
        new.checkpoint = None
        return _inline(new), ""
    if ref is not None and sum(len(getattr(new, k)) - ref.counts[k] for k in LISTS) < CHECKPOINT_EVERY:
        new.checkpoint = ref
        return _with_tail(new, ref), ""
    ref = _write_checkpoint(fs, new, version, token)
    new.checkpoint = ref
    return _with_tail(new, ref), ref.file


def put_whole(fs: FileSystem, log: VersionLog, version: int, manifest: Manifest, token: str) -> bool:
    """Create `version` holding all of `manifest`, built from scratch (migrate, repair: no older checkpoint is
    reused), compact once it is large; False when another writer took the version (its checkpoint is removed)."""
    manifest.checkpoint = None
    data, written = document(fs, manifest, manifest.copy(), version, token)
    if log.put(version, data):
        return True
    if written:
        fs.delete(f"{CHECKPOINT_DIR}/{written}")
    return False


def _still_valid(new: Manifest, base: Manifest) -> Checkpoint | None:
    """The base's checkpoint when `new` kept every entry it covers (appends only), else None."""
    ref: Checkpoint | None = base.checkpoint
    if ref is None:
        return None
    for name in LISTS:
        count, old, now = ref.counts[name], getattr(base, name), getattr(new, name)
        if len(now) < count or now[:count] != old[:count]:
            return None
    return ref


def _inline(manifest: Manifest) -> dict[str, Any]:
    return dict(manifest.to_json(), format=FORMAT_VERSION)


def _with_tail(manifest: Manifest, ref: Checkpoint) -> dict[str, Any]:
    data = _inline(manifest)
    tail = {k: data.pop(k)[ref.counts[k]:] for k in LISTS}
    return dict(data, format=FORMAT, checkpoint=asdict(ref), tail=tail)


def _write_checkpoint(fs: FileSystem, manifest: Manifest, version: int, token: str) -> Checkpoint:
    lists = {k: [asdict(e) for e in getattr(manifest, k)] for k in LISTS}
    data = (json.dumps(lists, separators=(",", ":")) + "\n").encode()
    name = f"{version:010d}-{token}.json"
    fs.write_bytes(f"{CHECKPOINT_DIR}/{name}", data)
    return Checkpoint(name, {k: len(v) for k, v in lists.items()}, hashlib.sha256(data).hexdigest(), version)


def stale_checkpoints(fs: FileSystem, oldest: Manifest | None, oldest_version: int) -> list[str]:
    """Checkpoint files no kept version can reference: older than the one the oldest kept version uses
    (versions only ever inherit their base's checkpoint or write a newer one)."""
    floor = oldest.checkpoint.version if oldest is not None and oldest.checkpoint is not None else oldest_version
    return [f"{CHECKPOINT_DIR}/{e.name}" for e in fs.list(CHECKPOINT_DIR)
            if not e.is_dir and 0 <= checkpoint_version(e.name) < floor]
