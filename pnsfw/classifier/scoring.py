"""`pnsfw score`: every vector of the store through the model, shard by shard, resumable.

STORE/scores/NAME/part-NNNNN.parquet mirrors STORE/shards/part-NNNNN.parquet
row for row (id, p_nsfw, p_<class>...). progress.json lists the parts done and
the fingerprint of the model file that scored them: a rerun scores only new
shards, and a retrained model starts over.
"""

import functools
import itertools
import json
import os
import threading
from collections import deque
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from ..errors import BadInput, StoreError
from ..store import Store
from ..store import shards as shard_io
from ..store.files import atomic_write_json, sha256_file
from ..store.lock import WriteLock
from .model import DEFAULT_NAME, Classifier, check_name, forward, load_classifier, model_paths

PROGRESS = "progress.json"
BATCH_ROWS = 1 << 16
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FORWARD_BLOCK = 2048  # rows: a 256-wide float32 block is 2 MB, one core's L2


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

    @property
    def vectors_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), vectors_per_s=self.vectors_per_s)


def scores_dir(store: Store, name: str) -> Path:
    return store.root / "scores" / check_name(name)


@functools.lru_cache(maxsize=1)
def _cpu_pool() -> tuple[ThreadPoolExecutor, Any]:
    from threadpoolctl import ThreadpoolController

    return ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))), ThreadpoolController()


def _numpy_engine(clf: Classifier, device: str, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """Cache-sized row blocks, one single-threaded BLAS call chain per core: cast, matmul and tanh stay in L2
    (one 64k-row pass per op through RAM was 2-3x slower), and numpy's element-wise ops use every core."""
    pool, controller = _cpu_pool()

    def run(vectors: np.ndarray) -> np.ndarray:
        blocks = [vectors[i:i + FORWARD_BLOCK] for i in range(0, len(vectors), FORWARD_BLOCK)]
        with controller.limit(limits=1, user_api="blas"):
            return np.concatenate(list(pool.map(lambda block: forward(clf.steps, block), blocks)))

    return run


def _torch_steps(clf: Classifier, device: Any, dtype: Any) -> list[tuple[Any, Any, Callable[[Any], Any]]]:
    import torch

    from .model import ACTIVATIONS

    acts = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "sigmoid": torch.sigmoid,
            "softmax": lambda h: torch.softmax(h, dim=1), "linear": lambda h: h, "relu": torch.relu}
    assert set(acts) == set(ACTIVATIONS)
    return [(torch.from_numpy(s.weight).to(device, dtype), torch.from_numpy(s.bias).to(device, dtype),
             acts[s.activation]) for s in clf.steps]


def _torch_engine(clf: Classifier, device: str, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """The same folded network in torch: fp16 rows in, float32 outputs back. On CPU, like the numpy
    engine, cache-sized blocks on one thread per core (bf16 matmuls use AVX512-BF16/AMX there)."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES[precision])
    dev = torch.device(device)
    steps = _torch_steps(clf, dev, dtype)

    def block(vectors: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(vectors)).to(dev, non_blocking=True).to(dtype)
            for weight, bias, act in steps:
                h = act(torch.addmm(bias, h, weight))
            return h.float().cpu().numpy()

    if dev.type != "cpu":
        return block
    pool, _ = _cpu_pool()

    def run(vectors: np.ndarray) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            blocks = [vectors[i:i + FORWARD_BLOCK] for i in range(0, len(vectors), FORWARD_BLOCK)]
            return np.concatenate(list(pool.map(block, blocks)))
        finally:
            torch.set_num_threads(threads)

    return run


def make_engine(clf: Classifier, engine: str = "auto", device: str = "cpu",
                precision: str = "fp32") -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """auto: numpy for fp32 on CPU (exact, folded); torch on CUDA or for bf16. device auto: CUDA if torch sees one."""
    if precision not in TORCH_DTYPES:
        raise BadInput(f"unknown precision {precision!r} (use {', '.join(TORCH_DTYPES)})")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if engine == "auto":
        engine = "torch" if device.startswith("cuda") or precision != "fp32" else "numpy"
    if engine == "numpy" and precision != "fp32":
        raise BadInput("the numpy engine computes in fp32 only; use --engine torch for bf16/fp16")
    if engine not in ENGINES:
        raise BadInput(f"unknown scoring engine {engine!r} ({', '.join(ENGINES)})")
    return engine, ENGINES[engine](clf, device, precision)


ENGINES: dict[str, Callable[[Classifier, str, str], Callable[[np.ndarray], np.ndarray]]] = {
    "numpy": _numpy_engine, "torch": _torch_engine}


def score_table(clf: Classifier, ids: np.ndarray, out: np.ndarray) -> pa.Table:
    """id, p_nsfw, then p_<class> per class."""
    columns = {"id": pa.array(ids, pa.int64()), "p_nsfw": pa.array(clf.to_p_nsfw(out), pa.float32())}
    probs = clf.to_probabilities(out)
    columns.update({f"p_{c}": pa.array(probs[:, i], pa.float32()) for i, c in enumerate(clf.classes)})
    return pa.table(columns)


def _read_shard(store: Store, path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = shard_io.read_table(path, ["id", "embedding"])
    return table.column("id").to_numpy(), shard_io.embedding_matrix(table.column("embedding"), store.dim)


def prefetched(store: Store, paths: list[Path], workers: int = 2) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """(path, ids, fp16 vectors) per shard, in order, read by threads a few shards ahead."""
    upcoming = iter(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque((p, pool.submit(_read_shard, store, p)) for p in itertools.islice(upcoming, workers + 1))
        while pending:
            path, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(_read_shard, store, following)))
            yield (path, *future.result())


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


def score_store(store_root: "str | Path", name: str = DEFAULT_NAME, device: str = "cpu", engine: str = "auto",
                batch_rows: int = BATCH_ROWS, precision: str = "fp32",
                on_shard: "Callable[[int], None] | None" = None) -> ScoreSummary:
    """Score every committed shard not yet scored by this exact model file (at this precision)."""
    store = Store.open(store_root)
    clf = load_classifier(store, name)
    folder = scores_dir(store, name)
    folder.mkdir(parents=True, exist_ok=True)
    with WriteLock(folder):
        progress, reset = _start(folder, clf, read_progress(folder), precision)
        todo = _pending_shards(store, folder, progress)
        engine_name, run = make_engine(clf, engine, device, precision)
        summary = ScoreSummary(name, shards_present=len(store.manifest["shards"]) - len(todo), rescored_all=reset,
                               engine=engine_name, precision=precision)
        started = time.perf_counter()
        by_name = {s["name"]: s for s in todo}

        def commit(part: str, table: pa.Table) -> None:
            """Part first, then the progress entry: a crash in between only re-scores that shard."""
            shard_io.write_parquet(table, folder / part)
            progress["shards"][part] = by_name[part]["sha256"]
            atomic_write_json(folder / PROGRESS, progress)
            if on_shard is not None:
                on_shard(table.num_rows)

        with ThreadPoolExecutor(max_workers=1) as writer:  # one thread: commits stay in shard order
            writes: "deque[Any]" = deque()
            for path, ids, vectors in prefetched(store, [store.root / "shards" / s["name"] for s in todo]):
                out = np.concatenate([run(vectors[i:i + batch_rows]) for i in range(0, max(len(ids), 1), batch_rows)])
                writes.append(writer.submit(commit, path.name, score_table(clf, ids, out[:len(ids)])))
                summary.scored += len(ids)
                summary.shards_scored += 1
                while len(writes) > 2 or (writes and writes[0].done()):
                    writes.popleft().result()  # bounded memory; re-raises a write error
            while writes:
                writes.popleft().result()
        summary.seconds = time.perf_counter() - started
    return summary


class _ScoreCache:
    """Sorted (ids, p_nsfw) of one scores folder, reloaded when progress.json or the model file changes."""

    def __init__(self) -> None:
        self._entries: dict[Path, tuple[Any, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
        folder, model = scores_dir(store, name), model_paths(store, name)["keras"]
        key = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in (folder / PROGRESS, model))
        with self._lock:
            cached = self._entries.get(folder)
            if cached is None or cached[0] != key:
                cached = (key, *_load_scores(store, name))
                self._entries[folder] = cached
        return cached[1], cached[2]


def _load_scores(store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    folder, model = scores_dir(store, name), model_paths(store, name)["keras"]
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
