"""`pnsfw score`: every vector of the store through the model, shard by shard, resumable.

STORE/scores/NAME/part-NNNNN.parquet mirrors STORE/shards/part-NNNNN.parquet
row for row (id, p_nsfw, p_<class>...). progress.json lists the parts done and
the fingerprint of the weights file that scored them: a rerun scores only new
shards, and a retrained model starts over.
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import StoreError
from ..store import Store
from ..store import shards as shard_io
from ..store.files import atomic_write, atomic_write_json, fsync_dir, sha256_file
from ..store.lock import WriteLock
from .engines import BATCH_ROWS, TORCH_DTYPES, Engine, check_options, make_engine
from .model import DEFAULT_NAME, Classifier, check_name, load_classifier, model_paths
from .pipeline import Pipeline

PROGRESS = "progress.json"
__all__ = ["BATCH_ROWS", "TORCH_DTYPES", "Engine", "lookup_scores", "make_engine", "score_store", "scored_parts"]


@dataclass
class ScoreSummary:
    model: str
    scored: int = 0
    shards_scored: int = 0
    shards_present: int = 0
    rescored_all: bool = False
    seconds: float = 0.0
    engine: str = "numpy"
    precision: str = "fp32"
    stages: dict[str, Any] = field(default_factory=dict)

    @property
    def vectors_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), vectors_per_s=self.vectors_per_s)


def scores_dir(store: Store, name: str) -> Path:
    return store.root / "scores" / check_name(name)


def score_table(clf: Classifier, ids: np.ndarray, out: np.ndarray) -> pa.Table:
    """id, p_nsfw, then p_<class> per class."""
    columns = {"id": pa.array(ids, pa.int64()), "p_nsfw": pa.array(clf.to_p_nsfw(out), pa.float32())}
    probs = clf.to_probabilities(out)
    columns.update({f"p_{c}": pa.array(probs[:, i], pa.float32()) for i, c in enumerate(clf.classes)})
    return pa.table(columns)


def read_progress(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}


def _pending_shards(store: Store, folder: Path, progress: dict[str, Any]) -> list[dict[str, Any]]:
    done = progress.get("shards", {})
    return [s for s in store.manifest["shards"]
            if done.get(s["name"]) != s["sha256"] or not (folder / s["name"]).is_file()]


def _start(folder: Path, clf: Classifier, progress: dict[str, Any], precision: str) -> tuple[dict[str, Any], bool]:
    """The progress to continue from, or a fresh one (deleting old parts) for another model or precision."""
    if progress.get("fingerprint") == clf.fingerprint and progress.get("precision", "fp32") == precision:
        return progress, False
    for path in folder.glob("part-*.parquet"):
        path.unlink()
    fresh = {"model": clf.name, "fingerprint": clf.fingerprint, "space": clf.space, "classes": clf.classes,
             "nsfw_classes": clf.nsfw_classes, "threshold": clf.threshold, "precision": precision, "shards": {}}
    return fresh, bool(progress)


def _write_part(clf: Classifier, folder: Path) -> Callable[[str, np.ndarray, np.ndarray], None]:
    """The part, fsynced and renamed; the folder is fsynced once per progress write (see _commit_parts).
    No dictionary (unique floats: it made a 50k-row part 5x slower to write and bigger), delta-coded ids."""
    def write(name: str, ids: np.ndarray, out: np.ndarray) -> None:
        import pyarrow.parquet as pq

        table = score_table(clf, ids, out)
        atomic_write(folder / name, lambda tmp: pq.write_table(
            table, tmp, compression="zstd", use_dictionary=False, column_encoding={"id": "DELTA_BINARY_PACKED"},
            row_group_size=shard_io.ROW_GROUP), sync_dir=False)

    return write


def _commit_parts(folder: Path, progress: dict[str, Any], sha256: dict[str, str],
                  on_shard: "Callable[[int], None] | None") -> Callable[[list[tuple[str, int]]], None]:
    """Parts first, then their progress entries: a crash in between only re-scores those shards."""
    def commit(parts: list[tuple[str, int]]) -> None:
        fsync_dir(folder)  # the parts' renames are durable before progress lists them
        progress["shards"].update((name, sha256[name]) for name, _ in parts)
        atomic_write_json(folder / PROGRESS, progress)
        for _, rows in parts if on_shard is not None else ():
            on_shard(rows)

    return commit


def _read_shard(store: Store) -> Callable[[Path], tuple[np.ndarray, list[np.ndarray]]]:
    """One thread per shard: the pipeline runs several readers, and Arrow's own threads on top were 2x slower
    (ParquetFile, not read_table: no dataset layer, ~0.4 ms less per shard)."""
    def read(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids, and the fp16 rows per row group (zero-copy views; Engine.prepare joins them)."""
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path, memory_map=True).read(["id", "embedding"], use_threads=False)
        blocks = [shard_io.embedding_matrix(c, store.dim) for c in table.column("embedding").chunks]
        return table.column("id").to_numpy(), blocks or [np.zeros((0, store.dim), np.float16)]

    return read


def score_store(store_root: "str | Path", name: str = DEFAULT_NAME, device: str = "cpu",
                engine: "str | Engine" = "auto", batch_rows: int = BATCH_ROWS, precision: str = "fp32",
                on_shard: "Callable[[int], None] | None" = None, readers: int = 0,
                writers: int = 0) -> ScoreSummary:
    """Score every committed shard not yet scored by this exact model file (at this precision).

    engine: a name (auto, numpy, torch) or an Engine; readers/writers: threads (0: from the core count)."""
    store = Store.open(store_root)
    clf = load_classifier(store, name)
    folder = scores_dir(store, name)
    folder.mkdir(parents=True, exist_ok=True)
    with WriteLock(folder):
        if isinstance(engine, str):
            check_options(engine, device, precision)
        progress, reset = _start(folder, clf, read_progress(folder), precision if isinstance(engine, str)
                                 else engine.precision)
        todo = _pending_shards(store, folder, progress)
        if isinstance(engine, str):  # built only when there is work: torch is not imported for nothing
            engine = make_engine(clf, engine, device, precision, batch_rows) if todo else Engine(engine, precision, 0)
        summary = ScoreSummary(name, shards_present=len(store.manifest["shards"]) - len(todo), rescored_all=reset,
                               engine=engine.name, precision=engine.precision)
        commit = _commit_parts(folder, progress, {s["name"]: s["sha256"] for s in todo}, on_shard)
        pipeline = Pipeline(engine, _read_shard(store), _write_part(clf, folder), commit, readers, writers)
        started = time.perf_counter()
        stages = pipeline.run([store.root / "shards" / s["name"] for s in todo])
        summary.seconds = time.perf_counter() - started
        summary.scored, summary.shards_scored = sum(s["rows"] for s in todo), len(todo)
        summary.stages = stages.as_dict()
    return summary


class _ScoreCache:
    """Sorted (ids, p_nsfw) of one scores folder, reloaded when progress.json or the model file changes."""

    def __init__(self) -> None:
        self._entries: dict[Path, tuple[Any, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
        folder, model = scores_dir(store, name), model_paths(store, name)["weights"]
        key = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (folder / PROGRESS, model))
        with self._lock:
            cached = self._entries.get(folder)
            if cached is None or cached[0] != key:
                cached = (key, *_load_scores(store, name))
                self._entries[folder] = cached
        return cached[1], cached[2]


def _load_scores(store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    folder, model = scores_dir(store, name), model_paths(store, name)["weights"]
    progress = read_progress(folder)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    if not model.is_file() or progress.get("fingerprint") != sha256_file(model)[:16]:
        return empty  # never scored, or scored by an older model: nothing is current
    parts = [shard_io.read_table(folder / n, ["id", "p_nsfw"]) for n in progress["shards"] if (folder / n).is_file()]
    if not parts:
        return empty
    table = pa.concat_tables(parts)
    ids, p = table.column("id").to_numpy(), table.column("p_nsfw").to_numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order], p[order]


_CACHE = _ScoreCache()


def lookup_scores(store: Store, name: str, ids: np.ndarray) -> np.ndarray:
    """p_nsfw from scores/NAME/ where present (and current), NaN where missing."""
    known, p = _CACHE.get(store, name)
    ids = np.asarray(ids, dtype=np.int64)
    result = np.full(len(ids), np.nan, np.float32)
    if len(known):
        at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        hit = known[at] == ids
        result[hit] = p[at[hit]]
    return result


def scored_parts(store: Store, name: str) -> list[str]:
    """Names of the current score parts, in shard order; StoreError if scores are missing or stale."""
    folder = scores_dir(store, name)
    progress = read_progress(folder)
    names = [s["name"] for s in store.manifest["shards"]]
    missing = [n for n in names if n not in progress.get("shards", {}) or not (folder / n).is_file()]
    if missing:
        raise StoreError(f"{len(missing)} shards of {store.root} are not scored by model {name!r}; "
                         f"run `pnsfw score --store {store.root} --model {name}`")
    return names
