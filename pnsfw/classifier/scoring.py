"""`pnsfw score`: every vector of the store through the model, shard by shard, resumable.

STORE/scores/NAME/<shard name> mirrors the shard row for row (id, uri, p_nsfw,
p_<class>...). The store's score progress log (scores/NAME/_progress/) lists the
parts done and the fingerprint of the weights file that scored them: a rerun
scores only new shards, and a retrained model starts over.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ..errors import StoreError
from ..progress import progress_bar
from ..store import Store, artifacts
from ..store import shards as shard_io
from ..store.files import sha256_file
from ..store.lock import WriteLock
from ..store.records import ScoreState, Shard
from .engines import BATCH_ROWS, TORCH_DTYPES, Engine, check_options, engine_name, make_engine
from .model import DEFAULT_NAME, Classifier, check_name, load_classifier, model_paths
from .pipeline import Pipeline

__all__ = ["BATCH_ROWS", "TORCH_DTYPES", "Engine", "UriStash", "lookup_scores", "make_engine", "part_writer",
           "score_store", "scored_parts", "shard_reader"]

REMOTE_READERS = 4  # reader threads for a store on object storage: shards downloading ahead of the engine


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


def scores_of(store: Store, name: str) -> artifacts.Scores:
    return store.scores(check_name(name))


def score_table(clf: Classifier, ids: np.ndarray, out: np.ndarray, uris: "pa.Array | None" = None) -> pa.Table:
    """id, uri (when given), p_nsfw, then p_<class> per class."""
    columns: dict[str, Any] = {"id": pa.array(ids, pa.int64())}
    if uris is not None:
        columns["uri"] = uris
    columns["p_nsfw"] = pa.array(clf.to_p_nsfw(out), pa.float32())
    probs = clf.to_probabilities(out)
    columns.update({f"p_{c}": pa.array(probs[:, i], pa.float32()) for i, c in enumerate(clf.classes)})
    return pa.table(columns)


def _pending_shards(store: Store, scores: artifacts.Scores, state: "ScoreState | None") -> list[Shard]:
    done = {} if state is None else state.shards
    present = set(scores.part_names())
    return [s for s in store.shards if done.get(s.name) != s.sha256 or s.name not in present]


def _start(store: Store, scores: artifacts.Scores, clf: Classifier, state: "ScoreState | None",
           precision: str) -> tuple[ScoreState, bool]:
    """The state to continue from, or a fresh one (deleting old parts) for another model or precision."""
    generation = artifacts.model_generation(store, clf.name)
    if state is not None and state.fingerprint == clf.fingerprint and state.precision == precision:
        return state, False
    scores.delete_parts(keep=set())
    fresh = ScoreState(clf.name, clf.fingerprint, clf.space, list(clf.classes), list(clf.nsfw_classes),
                       float(clf.threshold), precision, generation, {})
    return fresh, state is not None


def _write_part(clf: Classifier, scores: artifacts.Scores,
                uris: Callable[[str], "pa.Array | None"]) -> Callable[[str, np.ndarray, np.ndarray], None]:
    """The part, fsynced and renamed; the folder is made durable once per progress write (see _commit_parts).
    No dictionary (unique floats: it made a 50k-row part 5x slower to write and bigger), delta-coded ids."""
    def write(name: str, ids: np.ndarray, out: np.ndarray) -> None:
        import pyarrow.parquet as pq

        table = score_table(clf, ids, out, uris(name))
        scores.write_part(name, lambda tmp: pq.write_table(
            table, tmp, compression="zstd", use_dictionary=["uri"] if "uri" in table.column_names else False,
            column_encoding={"id": "DELTA_BINARY_PACKED"}, row_group_size=shard_io.ROW_GROUP))

    return write


def _commit_parts(scores: artifacts.Scores, fresh: ScoreState, sha256: dict[str, str],
                  on_rows: Callable[[int], None]) -> Callable[[list[tuple[str, int]]], None]:
    """Parts first, then their progress entries: a crash in between only re-scores those shards."""
    def commit(parts: list[tuple[str, int]]) -> None:
        scores.sync()  # the parts' renames are durable before progress lists them

        def change(state: "ScoreState | None") -> ScoreState:
            same = state is not None and (state.fingerprint, state.precision) == (fresh.fingerprint, fresh.precision)
            base = state if same and state is not None else ScoreState(**{**fresh.to_json(), "shards": {}})
            base.shards.update((name, sha256[name]) for name, _ in parts)
            return base

        scores.commit(change)
        for _, rows in parts:
            on_rows(rows)

    return commit


def part_writer(store: Store, clf: Classifier, uris: "UriStash | None" = None
                ) -> Callable[[str, np.ndarray, np.ndarray], None]:
    """The local run's part writer (score table with the shard's uris, zstd Parquet, renamed into place), for
    runners that write parts where they score (the Ray actors); the driver still commits them. `uris`: the
    stash of the shard_reader that read the shards (their uri columns come from that one read)."""
    return _write_part(clf, scores_of(store, clf.name), uris or UriStash(store))


def shard_reader(store: Store, uris: "UriStash | None" = None
                 ) -> Callable[[Shard], tuple[np.ndarray, list[np.ndarray]]]:
    """Reads a shard's ids and fp16 row blocks, as the local pipeline does (runners elsewhere use it too);
    with `uris`, its uri column too, kept there for the part writer."""
    return _read_shard(store, uris)


class UriStash:
    """The uri column of each shard read and not yet written, handed from the shard's reader to its part writer
    (one read of a shard, not two: on an object store the second was a second download); a shard not read
    through it has its uri column read on its own. Holds at most the shards in flight in the pipeline."""

    def __init__(self, store: Store):
        self.store, self._lock = store, threading.Lock()
        self._held: dict[str, pa.Array] = {}

    def put(self, name: str, uris: pa.Array) -> None:
        with self._lock:
            self._held[name] = uris

    def __call__(self, name: str) -> "pa.Array | None":
        with self._lock:
            held = self._held.pop(name, None)
        if held is not None:
            return held
        return self.store.read_shard(self.store.shard(name), ["uri"]).column("uri").combine_chunks()


def _read_shard(store: Store, uris: "UriStash | None") -> Callable[[Shard], tuple[np.ndarray, list[np.ndarray]]]:
    """One thread per shard: the pipeline runs several readers, and Arrow's own threads on top were 2x slower
    (ParquetFile, not read_table: no dataset layer, ~0.4 ms less per shard). A remote shard is one GET."""
    columns = ["id", "embedding"] if uris is None else ["id", "embedding", "uri"]

    def read(shard: Shard) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids, and the fp16 rows per row group (zero-copy views; Engine.prepare joins them)."""
        table = store.read_shard(shard, columns)
        if uris is not None:
            uris.put(shard.name, table.column("uri").combine_chunks())
        blocks = [shard_io.embedding_matrix(c, store.dim) for c in table.column("embedding").chunks]
        return table.column("id").to_numpy(), blocks or [np.zeros((0, store.dim), np.float16)]

    return read


def score_store(store_root: "str | Path", name: str = DEFAULT_NAME, device: str = "cpu",
                engine: "str | Engine" = "auto", batch_rows: int = BATCH_ROWS, precision: str = "fp32",
                on_shard: "Callable[[int], None] | None" = None, readers: int = 0,
                writers: int = 0, runner: "Runner | None" = None, progress: bool = False) -> ScoreSummary:
    """Score every committed shard not yet scored by this exact model file (at this precision).

    engine: a name (auto, numpy, torch) or an Engine; readers/writers: threads (0: from the core count);
    runner: scores the pending shards in place of the local pipeline (the Ray runner), through the same
    part writer and progress commits; progress: a bar on stderr (rows committed, rows/s, ETA)."""
    store = Store.open(store_root)
    clf = load_classifier(store, name)
    store.ensure_v2()
    scores = scores_of(store, name)
    with ExitStack() as stack:
        if store.fs.local:
            lock = WriteLock(store.fs.local_path(scores.folder), "_LOCK")
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(lock)
        if isinstance(engine, str):
            check_options(engine, device, precision)
        state, reset = _start(store, scores, clf, scores.state(), precision if isinstance(engine, str)
                              else engine.precision)
        todo = _pending_shards(store, scores, state)
        bar = stack.enter_context(progress_bar(progress and bool(todo), sum(s.rows for s in todo), "rows",
                                               f"score {name}"))
        commit = _commit_parts(scores, state, {s.name: s.sha256 for s in todo}, _both(on_shard, bar.update))
        summary = ScoreSummary(name, shards_present=len(store.shards) - len(todo), rescored_all=reset,
                               precision=precision if isinstance(engine, str) else engine.precision)
        if runner is not None and isinstance(engine, str):  # the runner builds the engines where they run
            job = ScoreJob(store, clf, todo, (engine, device, precision, batch_rows),
                           _write_part(clf, scores, UriStash(store)), commit)
            summary.engine = f"{engine_name(engine, device, precision)} on {runner.name}"
            return _timed_run(summary, todo, lambda: runner(job))
        if isinstance(engine, str):  # built only when there is work: torch is not imported for nothing
            engine = make_engine(clf, engine, device, precision, batch_rows) if todo else Engine(engine, precision, 0)
        summary.engine, summary.precision = engine.name, engine.precision
        stash = UriStash(store)
        readers = readers or (0 if store.fs.local else REMOTE_READERS)
        pipeline = Pipeline(engine, _read_shard(store, stash), _write_part(clf, scores, stash), commit,
                            readers, writers)
        # a Shard has the .name the pipeline uses
        return _timed_run(summary, todo, lambda: pipeline.run(todo).as_dict())  # type: ignore[arg-type]


def _both(first: "Callable[[int], None] | None", second: Callable[[int], Any]) -> Callable[[int], None]:
    """Call both with the rows of each committed part (the caller's on_shard, then the progress bar)."""
    def call(rows: int) -> None:
        if first is not None:
            first(rows)
        second(rows)

    return call


@dataclass
class ScoreJob:
    """The pending shards of one `score` run, for a runner other than the local pipeline."""

    store: Store
    classifier: Classifier
    shards: list[Shard]
    engine: tuple[str, str, str, int]  # engine name, device, precision, batch rows (as make_engine takes them)
    write: Callable[[str, np.ndarray, np.ndarray], None]  # the part of a shard: name, ids, model outputs
    commit: Callable[[list[tuple[str, int]]], None]  # progress entries for written parts: (name, rows)



class Runner(Protocol):
    """Scores a job's shards, writing and committing each through the job; returns stage figures."""

    name: str

    def __call__(self, job: ScoreJob) -> dict[str, Any]: ...


def _timed_run(summary: ScoreSummary, todo: list[Shard], run: Callable[[], dict[str, Any]]) -> ScoreSummary:
    started = time.perf_counter()
    summary.stages = run()
    summary.seconds = time.perf_counter() - started
    summary.scored, summary.shards_scored = sum(s.rows for s in todo), len(todo)
    return summary


class _ScoreCache:
    """Sorted (ids, p_nsfw) of one scores folder, reloaded when its progress or the model generation changes."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[Any, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
        store.follow()
        scores = scores_of(store, name)
        key = (scores.version(), artifacts.model_generation(store, name))
        with self._lock:
            cached = self._entries.get((store.root, name))
            if cached is None or cached[0] != key:
                cached = (key, *_load_scores(store, name))
                self._entries[(store.root, name)] = cached
        return cached[1], cached[2]


def iter_scores(store: Store, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids int64, p_nsfw float32) of each current score part of model NAME, one part at a time; nothing when
    the scores are missing or were made by an older model."""
    scores = scores_of(store, name)
    state = scores.state()
    if state is None or name not in artifacts.model_names(store):
        return
    model = model_paths(store, name)["weights"]
    if not model.is_file() or state.fingerprint != sha256_file(model)[:16]:
        return  # scored by an older model: nothing is current
    present = set(scores.part_names())
    for part in state.shards:
        if part in present:
            table = shard_io.read_table(scores.part_source(part), ["id", "p_nsfw"])
            yield table.column("id").to_numpy(), table.column("p_nsfw").to_numpy()


def _load_scores(store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    parts = list(iter_scores(store, name))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids, p = np.concatenate([i for i, _ in parts]), np.concatenate([q for _, q in parts])
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
    scores = scores_of(store, name)
    state = scores.state()
    done = {} if state is None else state.shards
    present = set(scores.part_names())
    names = [s.name for s in store.shards]
    missing = [n for n in names if n not in done or n not in present]
    if missing:
        raise StoreError(f"{len(missing)} shards of {store.root} are not scored by model {name!r}; "
                         f"run `pnsfw score --store {store.root} --model {name}`")
    return names
