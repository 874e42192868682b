"""kNN queries over the store: by vector, by store id; every hit with its uri and, given a scorer, p_nsfw.

The scorer and the encoder are handed in (protocols.py): search imports neither the classifier nor the indexer.
"""

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInput, NotFound, StoreError
from ..store import Store
from ..store.lookup import StringColumn
from .index import add_shards, gpu_count, load_index, read_meta
from .protocols import Encoder, Scorer

K_MAX = 1000
log = logging.getLogger("pnsfw.search")
__all__ = ["Hit", "Searcher", "StringColumn", "check_k", "run_search", "unit_vectors"]


@dataclass
class Hit:
    id: int
    uri: str
    similarity: float
    p_nsfw: "float | None" = None
    label: "str | None" = None


def unit_vectors(vectors: Any, dim: int) -> np.ndarray:
    """Query vectors (n, dim) or (dim,) -> (n, dim) float32 of norm 1 (normalised in float64, so huge values
    keep their direction); BadInput for a wrong shape, NaN/inf, or a zero vector."""
    try:
        x = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"a query vector must be {dim} numbers") from None
    x = x[None, :] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != dim:
        raise BadInput(f"a query vector must have {dim} values (the store's space), got shape {x.shape}")
    if not np.isfinite(x).all() or not np.isfinite(x.astype(np.float32)).all():
        raise BadInput("a query vector must be finite (no NaN, no infinity, within float32)")
    scale = np.abs(x).max(axis=1, keepdims=True)
    if (scale == 0).any():
        raise BadInput("a query vector must not be all zeros (it has no direction)")
    x /= scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= K_MAX:
        raise BadInput(f"k must be an integer in 1..{K_MAX}, got {k!r}")
    return int(k)


def _to_gpu(index: Any, kind: str) -> Any:
    """Flat and IVF indexes search on the GPU when faiss has one; HNSW stays on the CPU."""
    import faiss

    if kind == "hnsw" or not gpu_count():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # a factory kind without a GPU version
        return index


class Searcher:
    """The store's index and (optionally) a scorer, loaded once; thread-safe reads.

    Per row it holds only compact arrays (p_nsfw as float32 when a scorer is attached); ids map to rows through
    the manifest's id ranges, and uris and metadata are read by id from one row group of one shard."""

    def __init__(self, store: Store, index: Any, meta: dict[str, Any], scorer: "Scorer | None" = None):
        self.store, self.index, self.meta, self.scorer = store, index, meta, scorer
        self.ids = store.ids  # this version's rows, whatever the store object is refreshed to later
        self._vectors: np.ndarray | None = None
        self._scores: np.ndarray | None = None
        self._scores_lock = threading.Lock()
        self.labels: dict[int, str] = {}
        self.cache: dict[str, Any] = {}  # lazily built helpers (explain's labelled-example index)
        self.backend: dict[str, Any] = _describe_index(index, meta)

    @property
    def rows(self) -> int:
        return self.ids.rows

    @classmethod
    def open(cls, store: Store, scorer: "Scorer | None" = None, exact_device: "str | None" = None) -> "Searcher":
        """Load the index (plus shards it does not cover yet, in memory); hits get p_nsfw from `scorer`.

        `exact_device` (cuda, cpu, auto = cuda when torch sees one) searches exactly with torch on that
        device instead of the FAISS index (see exact.py); None searches the FAISS index.
        """
        if not store.exists or not store.rows:
            raise StoreError(f"store {store.root} is empty (run `pnsfw index SOURCE --store {store.root}`)")
        if exact_device is not None:
            searcher = cls(store, None, read_meta(store) or {})
            searcher.use_exact(exact_device)
        else:
            index, meta = load_index(store)
            todo = [s.name for s in store.shards if s.name not in set(meta["shards"])]
            add_shards(index, store, todo)
            searcher = cls(store, _to_gpu(index, meta["kind"]), meta)
        if scorer is not None:
            searcher.attach_scorer(scorer)
        return searcher

    def use_exact(self, device: str = "auto") -> None:
        """Search with `TorchExact` over every stored vector on DEVICE (the FAISS index is dropped)."""
        from .exact import TorchExact, resolve_device

        self.index = TorchExact(self.ids.all_ids(), self.vectors(), resolve_device(device))
        self.backend = self.index.describe()

    def attach_scorer(self, scorer: Scorer) -> None:
        """Use `scorer` for p_nsfw (its bulk scores when present) and its training labels."""
        self.scorer, self._scores = scorer, None
        self.labels = scorer.training_labels()

    @property
    def dim(self) -> int:
        return self.store.dim

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Store ids -> row positions (the order of `vectors()`; -1 where unknown)."""
        return self.ids.rows_of(ids)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ids; NotFound naming the first id the searcher's store version lacks."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows = self.rows_of(ids)
        if (rows < 0).any():
            raise NotFound(f"id {int(ids[np.argmax(rows < 0)])} is not in store {self.store.root}")
        return rows

    def _row(self, item_id: int) -> int:
        return int(self._rows(np.array([item_id]))[0])

    def vectors(self) -> np.ndarray:
        """Every stored vector (fp16, row order), read on first use (exact search, dedup, the review queue)."""
        if self._vectors is None:
            self._vectors = self.store.vectors()[1]
        return self._vectors

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """fp16 vectors of ids: from memory when every vector is loaded, else from their row groups."""
        rows = self._rows(ids)
        return self._vectors[rows] if self._vectors is not None else self.store.vectors_of(ids)

    def vector_of(self, item_id: int) -> np.ndarray:
        return self.vectors_of(np.array([item_id], np.int64))[0].astype(np.float32)

    def stored_scores(self) -> "np.ndarray | None":
        """p_nsfw of every row as one float32 array (NaN: no bulk score), built part by part on first use (4
        bytes a row; no array of all ids); None while another thread builds it, or without a scorer."""
        if self.scorer is not None and self._scores is None and self._scores_lock.acquire(blocking=False):
            try:
                self._read_scores()
            finally:
                self._scores_lock.release()
        return self._scores

    def _read_scores(self) -> None:
        if self._scores is None and self.scorer is not None:
            scores = np.full(self.rows, np.nan, np.float32)
            for ids, p in self.scorer.stored_parts():
                rows = self.rows_of(ids)
                known = rows >= 0
                scores[rows[known]] = p[known]
            self._scores = scores

    def load_scores_in_background(self, fill: bool) -> threading.Thread:
        """Read the bulk scores on a thread of their own (and with `fill` compute the missing ones); hits
        meanwhile score their rows from their vectors (the lock is taken here, so none builds it first)."""
        self._scores_lock.acquire()

        def run() -> None:
            try:
                self._read_scores()
            except Exception as exc:  # a damaged part: hits compute their p_nsfw (and say what is wrong)
                log.warning("cannot read the bulk scores of %s: %s", self.store.root, exc)
                return
            finally:
                self._scores_lock.release()
            if fill:
                self.fill_scores()

        thread = threading.Thread(target=run, name="pnsfw-scores", daemon=True)
        thread.start()
        return thread

    def p_nsfw_of_rows(self, rows: np.ndarray) -> "np.ndarray | None":
        """p_nsfw of stored rows: the bulk scores where scored, else computed (and kept) for just these rows;
        while another thread reads the bulk scores, computed for these rows from their vectors."""
        if self.scorer is None:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        stored = self.stored_scores()
        if stored is None:
            return np.asarray(self.scorer.p_nsfw(self.vectors_of(self.ids.ids_of(rows)).astype(np.float32)),
                              dtype=np.float32)
        scores = stored[rows]
        missing = np.isnan(scores)
        if missing.any():
            lost = rows[missing]
            vectors = self.vectors_of(self.ids.ids_of(lost))
            scores[missing] = self.scorer.p_nsfw(vectors.astype(np.float32))
            stored[lost] = scores[missing]
        return scores

    def fill_scores(self) -> int:
        """p_nsfw of every row without a bulk score, computed now (so hits need no forward pass); the count."""
        stored = self.stored_scores()
        if stored is None or self.scorer is None:
            return 0
        missing = int(np.isnan(stored).sum())
        if not missing:
            return 0
        bounds, shards = self.ids.rows_before, {s.name: s for s in self.store.shards}
        unscored = [shards[name] for i, name in enumerate(self.ids.names)
                    if np.isnan(stored[bounds[i]:bounds[i + 1]]).any()]
        for ids, vectors in self.store.iter_vectors(unscored):  # streamed: the vectors are not kept
            rows = self.rows_of(ids)
            todo = np.isnan(stored[rows])
            if todo.any():
                stored[rows[todo]] = self.scorer.p_nsfw(vectors[todo].astype(np.float32))
        return missing

    def search_arrays(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (n, k'), store ids (n, k')) of the nearest items, k' = min(k, ntotal); -1 ids: none."""
        k = check_k(k)
        return self.index.search(np.ascontiguousarray(unit_vectors(vectors, self.dim)), min(k, self.index.ntotal))

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """k nearest stored items for each query vector (n, dim); one batched search."""
        sims, ids = self.search_arrays(vectors, k)
        return [[Hit(**h) for h in row] for row in self.hit_rows(ids, sims)]

    def hit_rows(self, ids: np.ndarray, sims: np.ndarray) -> list[list[dict[str, Any]]]:
        """Per query, its hits as plain dicts (id, uri, similarity, p_nsfw, label): one vectorised lookup of
        uris and scores for the whole batch."""
        keep = ids >= 0
        flat_ids, flat_sims = ids[keep], sims[keep]
        rows = self.rows_of(flat_ids)
        uris = self.store.uris_of(flat_ids)
        scores = self.p_nsfw_of_rows(rows)
        p = [None] * len(rows) if scores is None else scores.astype(np.float64).tolist()
        labels = self.labels
        hits = [{"id": i, "uri": u, "similarity": s, "p_nsfw": q, "label": labels.get(i) if labels else None}
                for i, u, s, q in zip(flat_ids.tolist(), uris, flat_sims.astype(np.float64).tolist(), p)]
        out, at = [], 0
        for count in keep.sum(axis=1).tolist():
            out.append(hits[at:at + count])
            at += count
        return out

    def search_id(self, item_id: int, k: int) -> list[Hit]:
        """The item itself first (similarity 1), then its k - 1 nearest others."""
        sims, ids = self.search_arrays(self.vector_of(item_id)[None, :], min(check_k(k) + 1, K_MAX))
        return [Hit(**h) for h in self.item_first(item_id, self.hit_rows(ids, sims)[0], k)]

    def item_first(self, item_id: int, hits: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
        """Hits of a query by id: the item itself first with similarity 1 (exact copies or fp16 noise could
        outrank it), then the others in order; k in all."""
        own = self.hit_rows(np.array([[item_id]], np.int64), np.ones((1, 1), np.float32))[0]
        return (own + [h for h in hits if h["id"] != item_id])[:k]

    def item(self, item_id: int) -> dict[str, Any]:
        """Metadata of a stored item, its metadata columns included (+ p_nsfw and training label with a model)."""
        row = self._row(item_id)
        item = self.store.lookup([item_id]).to_pylist()[0]
        if self.scorer is not None:
            scores = self.p_nsfw_of_rows(np.array([row]))
            assert scores is not None
            item["p_nsfw"] = float(scores[0])
            item["label"] = self.labels.get(int(item_id))
        return item


def _describe_index(index: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """What searches run on, for /v1/stats: the FAISS index kind, on the CPU (all cores) or faiss' GPUs."""
    if index is None:
        return {}
    on_gpu = any(word in type(index).__name__ for word in ("Gpu", "Replicas"))  # IndexShards: segments
    info = {"backend": "faiss", "kind": meta.get("kind"), "factory": meta.get("factory"),
            "device": "cuda" if on_gpu else "cpu", "ntotal": int(index.ntotal),
            "segments": len(meta.get("segments") or [None])}
    if not on_gpu:
        info["threads"] = _use_all_cores()
    return info


def _use_all_cores() -> int:
    """FAISS (OpenMP) searches a batch with one thread per core this process may run on."""
    import os

    import faiss

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(threads)
    return threads


def run_search(store_root: str, *, item_id: "int | None" = None, image: "str | None" = None,
               text: "str | None" = None, vector: "np.ndarray | None" = None, k: int = 10,
               scorer: "Scorer | None" = None, encoder: "Encoder | None" = None) -> list[Hit]:
    """`pnsfw search`: the k nearest items to a store id, an image file, a text or a vector (one query)."""
    k = check_k(k)
    searcher = Searcher.open(Store.open(store_root), scorer)
    if item_id is not None:
        return searcher.search_id(item_id, k)
    if vector is None:
        if encoder is None:
            raise BadInput("an --image or --text query needs the store's CLIP encoder")
        vector = encoder.embed_texts([text])[0] if text is not None else encoder.embed_image_file(str(image))
    return searcher.search_vectors(np.asarray(vector, np.float32).reshape(1, -1), k)[0]
