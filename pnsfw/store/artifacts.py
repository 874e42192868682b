"""Multi-file artefacts and bookkeeping: index generations, model generations, scores, labels.

An index (faiss.index + index.json) or a model (NAME.keras, NAME.json, its weights, labels, plots) is
written into a fresh folder (`index/GEN/`, `models/NAME/GEN/`) and becomes current when a manifest version
points at it, so a reader never pairs files of two generations. Scores live in `scores/NAME/part-*.parquet`
(named after the shard they mirror) with their progress in the versioned log `scores/NAME/_progress/`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import StoreError
from . import hooks, shards
from .log import VersionLog
from .records import Generation, Manifest, Part, ScoreState
from .store import Store, writer_token

log = logging.getLogger("pnsfw.store")
INDEX_FILE = "faiss.index"
INDEX_META = "index.json"
SEGMENT_FILE = "segment.faiss"  # the rows an update added (a generation's own segment after the base)
LISTS_FILE = "lists.faiss"  # an IVF update's segment: only its inverted lists (written by faiss.write_InvertedLists)
TRAINED_FILE = "trained.faiss"  # the trained empty index (IVF quantizer and codebooks): what updates start from


@contextmanager
def _staging(store: Store, parent: str) -> Iterator[Path]:
    """A local folder to fill; inside the store for a local one (published by one rename)."""
    local = store.fs.staging_dir(parent)
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def publish(store: Store, parent: str, fill: Callable[[Path], None]) -> str:
    """fill(local folder), then make it appear as PARENT/GEN; returns the folder (not yet referenced)."""
    folder = f"{parent}/{writer_token()}"
    with _staging(store, parent) as local:
        fill(local)
        hooks.pause(f"generation:{parent}:filled")
        store.fs.put_tree(local, folder)
    hooks.pause(f"generation:{parent}:published")
    return folder


# ---- the FAISS index
def index_meta(store: Store) -> dict[str, Any] | None:
    """index.json of the current index generation (None without an index)."""
    gen = store.manifest.index
    if gen is None:
        return None
    rel = f"{gen.folder}/{INDEX_META}"
    try:
        meta: dict[str, Any] = json.loads(store.fs.read_bytes(rel))
        return meta
    except FileNotFoundError:
        raise StoreError(f"index {store.fs.url(gen.folder)} is missing; "
                         f"run `pnsfw repair --store {store.root}`") from None
    except ValueError as exc:
        raise StoreError(f"cannot read {store.fs.url(rel)}: {exc}; "
                         f"run `pnsfw repair --store {store.root}`") from None


def index_file(store: Store) -> Path:
    """A local path of the current generation's first (base) segment file."""
    meta = index_meta(store)
    if meta is None:
        raise StoreError(f"store {store.root} has no index (run `pnsfw reindex --store {store.root}`)")
    return segment_path(store, index_segments(store, meta)[0])


def _resolved(store: Store, entry: dict[str, Any]) -> dict[str, Any]:
    """An index.json file entry with its folder: entries without one are the current generation's own files."""
    gen = store.manifest.index
    return entry if "folder" in entry or gen is None else dict(entry, folder=gen.folder)


def index_segments(store: Store, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments of the current index generation, base first: each {folder, file, rows, shards, bytes}. A
    one-file generation (older stores; `commit_index`) is one segment: its faiss.index over every shard."""
    if meta.get("segments"):
        return [_resolved(store, e) for e in meta["segments"]]
    gen = store.manifest.index
    if gen is None:
        return []
    return [{"folder": gen.folder, "file": INDEX_FILE, "rows": int(meta.get("ntotal", 0)),
             "shards": list(meta.get("shards", [])), "bytes": None}]


def segment_path(store: Store, segment: dict[str, Any]) -> Path:
    """A local path of a segment's (or the trained part's) file."""
    return store.fs.local_path(f"{segment['folder']}/{segment['file']}")


def trained_part(store: Store, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The generation's trained empty index {folder, file, bytes} (None: the kind needs no training, or a
    one-file generation, which keeps none)."""
    return _resolved(store, meta["trained"]) if meta.get("trained") else None


def index_files(store: Store, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file the current generation references (segments, trained part), folders resolved."""
    trained = trained_part(store, meta)
    return index_segments(store, meta) + ([trained] if trained else [])


@dataclass
class NewSegment:
    """A segment an index commit writes: write(path) writes its FAISS file; it holds `rows` rows of `shards`;
    `lists`: the file holds only IVF inverted lists (the quantizer and codebooks are the trained part's)."""

    write: Callable[[Path], None]
    rows: int
    shards: list[str]
    lists: bool = False


def commit_index(store: Store, write: Callable[[Path], None], meta: dict[str, Any],
                 base: Generation | None) -> bool:
    """Write faiss.index (via write(path)) and index.json as one new one-file generation (the format before
    segments); see commit_segments."""
    return _commit_generation(store, {INDEX_FILE: write}, meta, base, [])


def commit_segments(store: Store, meta: dict[str, Any], base: Generation | None, kept: list[dict[str, Any]],
                    new: NewSegment, trained: Callable[[Path], None] | dict[str, Any] | None) -> bool:
    """A new generation: the `kept` segments of earlier ones (index_segments entries), then `new`; `trained`:
    the trained empty index, written here (a callable) or an earlier generation's entry. False (nothing kept)
    when another writer replaced the index `base` meanwhile.

    Kept files stay where an earlier generation wrote them, referenced, not copied: the manifest's entry lists
    their folders (`uses`) so the orphan sweep keeps them as long as it keeps this generation."""
    name = (LISTS_FILE if new.lists else SEGMENT_FILE) if kept else INDEX_FILE
    own: dict[str, Any] = {"file": name, "rows": new.rows, "shards": new.shards}
    if new.lists:
        own["lists"] = True
    files = {name: new.write}
    if callable(trained):
        files[TRAINED_FILE] = trained
        trained = {"file": TRAINED_FILE}
    meta = dict(meta, segments=[*kept, own], trained=trained)
    return _commit_generation(store, files, meta, base, [*kept, *([trained] if trained else [])])


def _commit_generation(store: Store, files: dict[str, Callable[[Path], None]], meta: dict[str, Any],
                       base: Generation | None, reused: list[dict[str, Any]]) -> bool:
    meta = json.loads(json.dumps(meta))
    own = [e for e in [*meta.get("segments", []), meta.get("trained") or {}] if e and "folder" not in e]

    def fill(local: Path) -> None:
        for name, write in files.items():
            write(local / name)
        for entry in own:
            entry["bytes"] = (local / entry["file"]).stat().st_size
        (local / INDEX_META).write_text(json.dumps(meta, indent=1) + "\n")

    folder = publish(store, "index", fill)
    uses = sorted({e["folder"] for e in reused if "folder" in e} - {folder})
    info = {k: meta.get(k) for k in ("kind", "factory", "ntotal", "space")} | {
        "shards": len(meta.get("shards", [])), "segments": len(meta.get("segments") or [None])}
    lost: list[bool] = []

    def change(manifest: Manifest) -> Manifest | None:
        current = manifest.index.folder if manifest.index else None
        if current != (base.folder if base else None):
            lost.append(True)
            return None
        manifest.index = Generation(folder, time.time(), info, uses)
        return manifest

    store.commit(change, "the index")
    if lost:
        log.info("another writer replaced the index meanwhile; keeping theirs")
        store.fs.delete(folder)
    return not lost


# ---- models
def model_names(store: Store) -> list[str]:
    return sorted(store.manifest.models)


def model_folder(store: Store, name: str) -> Path | None:
    """A local folder holding the current generation of model NAME's files (None when there is none)."""
    gen = store.manifest.models.get(name)
    if gen is None and store.follow(0.0):  # committed since this store was opened?
        gen = store.manifest.models.get(name)
    return None if gen is None else store.fs.local_path(gen.folder)


def model_generation(store: Store, name: str) -> str:
    """The folder of model NAME's current generation ("" when there is none): changes on every train."""
    gen = store.manifest.models.get(name)
    return "" if gen is None else gen.folder


class ModelStage:
    """A local folder to write model NAME's files into; `commit()` makes them its current generation in one
    manifest commit (a later train of the same name wins). Never committed: the next writer sweeps it."""

    def __init__(self, store: Store, name: str):
        store.ensure_v2()
        self.store, self.name = store, name
        self.target = f"models/{name}/{writer_token()}"
        self.remote = not store.fs.local
        parent = f"models/{name}"
        self.folder = store.fs.staging_dir(parent)

    def relocate(self, data: Any) -> Any:
        """data (JSON-able) with paths into the staging folder pointing at the committed generation instead."""
        final = str(self.store.fs.local_path(self.target)) if self.store.fs.local else self.store.fs.url(self.target)
        return json.loads(json.dumps(data).replace(json.dumps(str(self.folder))[1:-1], json.dumps(final)[1:-1]))

    def commit(self, info: dict[str, Any] | None = None) -> Generation:
        hooks.pause("generation:model:filled")
        try:
            self.store.fs.put_tree(self.folder, self.target)
        finally:
            if self.remote:
                shutil.rmtree(self.folder, ignore_errors=True)
        hooks.pause("generation:model:published")
        gen = Generation(self.target, time.time(), info or {})

        def change(manifest: Manifest) -> Manifest:
            manifest.models[self.name] = gen
            return manifest

        self.store.commit(change, f"model {self.name}")
        return gen


# ---- labels
def conform_labels(table: pa.Table) -> pa.Table:
    """A labels table in LABEL_SCHEMA: the optional columns it lacks (by, classes) added as nulls."""
    for column in shards.LABEL_SCHEMA:
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(shards.LABEL_SCHEMA.names).cast(shards.LABEL_SCHEMA)


def append_labels(store: Store, table: pa.Table) -> Part:
    """Commit labels (id, label, source, at[, by, classes]) as one labels part."""
    from .writer import stage_table

    table = conform_labels(table)
    base = store.manifest
    staged = stage_table(store, "labels", base.next_part(base.labels), table, {})
    part = Part(staged.name, staged.rows, staged.sha256, staged.bytes, time.time())

    def change(manifest: Manifest) -> Manifest:
        manifest.labels.append(part)
        return manifest

    store.commit(change, "labels")
    return part


def read_labels(store: Store, parts: list[Part] | None = None) -> pa.Table:
    """Every committed label, oldest first (a later label of an id overrides an earlier one); `parts`: only
    these parts of the manifest (a reader that keeps what it read takes only the new ones)."""
    chosen = store.manifest.labels if parts is None else parts
    tables = [conform_labels(shards.read_table(store.fs.open_input(f"labels/{p.name}"))) for p in chosen]
    return pa.concat_tables(tables) if tables else shards.LABEL_SCHEMA.empty_table()


# ---- scores
class Scores:
    """scores/NAME/: one part per shard (same name) and the progress log that says which are current."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.folder = f"scores/{name}"
        self.log = VersionLog(store.fs, f"{self.folder}/_progress")

    def state(self) -> ScoreState | None:
        latest = self.log.latest()
        if latest is None:
            from .legacy import legacy_score_state

            return legacy_score_state(self.store, self.name) if self.store.legacy else None
        return ScoreState.from_json(latest[1], self.store.fs.url(f"{self.folder}/_progress"))

    def version(self) -> int:
        versions = self.log.versions()
        return versions[-1] if versions else (-1 if self.store.fs.exists(f"{self.folder}/progress.json") else 0)

    def part(self, shard: str) -> str:
        return f"{self.folder}/{shard}"

    def part_names(self) -> list[str]:
        """Score parts present in the folder (one listing)."""
        return [e.name for e in self.store.fs.list(self.folder) if e.name.endswith(".parquet")
                and not e.name.startswith((".", "_"))]

    def has_part(self, shard: str) -> bool:
        return self.store.fs.exists(self.part(shard))

    def part_source(self, shard: str) -> Any:
        return self.store.fs.open_input(self.part(shard))

    def write_part(self, shard: str, write: Callable[[Path], None]) -> None:
        """Written and renamed; `sync()` makes a batch of them durable before `commit` lists them."""
        self.store.fs.write_file(self.part(shard), write, sync=False)

    def sync(self) -> None:
        self.store.fs.sync_dir(self.folder)

    def commit(self, change: Callable[[ScoreState | None], ScoreState | None]) -> ScoreState | None:
        """Apply change(current state) as the next progress version (re-applied on a lost race)."""
        self.store.ensure_v2()
        result: list[ScoreState] = []

        def read() -> tuple[int, ScoreState | None]:
            latest = self.log.latest()
            if latest is None:
                return 0, None
            return latest[0], ScoreState.from_json(latest[1], self.store.fs.url(f"{self.folder}/_progress"))

        def apply(state: ScoreState | None) -> dict[str, Any] | None:
            new = change(state)
            if new is not None:
                result.append(new)
            return None if new is None else new.to_json()

        self.log.commit(read, apply, f"scores of {self.name}")
        return result[-1] if result else self.state()

    def delete_parts(self, keep: set[str]) -> None:
        """Remove score parts not in keep (old parts after a model change)."""
        for entry in self.store.fs.list(self.folder):
            if entry.name.endswith(".parquet") and entry.name not in keep:
                self.store.fs.delete(f"{self.folder}/{entry.name}")

    def names(self) -> list[str]:
        return sorted(e.name for e in self.store.fs.list("scores") if e.is_dir and not e.name.startswith((".", "_")))
