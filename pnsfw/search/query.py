"""kNN queries over the store: by vector, by store id; every hit with its uri and, given a model, p_nsfw."""

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInput, NotFound, StoreError
from ..store import Store
from ..store.projection import l2_normalize
from .index import add_shards, gpu_count, load_index, read_meta

K_MAX = 1000
ITEM_COLUMNS = ["id", "uri", "source", "sha256", "width", "height"]


class StringColumn:
    """A string column read by row straight from its Arrow buffers (a pyarrow `take` costs ~0.5 ms a call)."""

    def __init__(self, column: Any):
        import pyarrow as pa

        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        array = array.cast(pa.large_string())
        _, offsets, data = array.buffers()
        self.offsets = np.frombuffer(offsets, np.int64)[array.offset: array.offset + len(array) + 1]
        self.data = memoryview(data) if data is not None else memoryview(b"")

    def take(self, rows: np.ndarray) -> list[str]:
        """The strings at `rows` (row positions, not ids)."""
        starts, data = self.offsets, self.data
        rows = np.asarray(rows, dtype=np.int64)
        return [str(data[a:b], "utf-8") for a, b in zip(starts[rows].tolist(), starts[rows + 1].tolist())]


@dataclass
class Hit:
    id: int
    uri: str
    similarity: float
    p_nsfw: "float | None" = None
    label: "str | None" = None


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
    """The store's index, item table and (optionally) classifier, loaded once; thread-safe reads."""

    def __init__(self, store: Store, index: Any, meta: dict[str, Any], classifier: Any = None):
        self.store, self.index, self.meta, self.classifier = store, index, meta, classifier
        self.table = store.table(ITEM_COLUMNS)
        ids = self.table.column("id").to_numpy()
        self.uris = StringColumn(self.table.column("uri"))
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._vectors: np.ndarray | None = None
        self._scores: np.ndarray | None = None
        self.labels: dict[int, str] = {}
        self.cache: dict[str, Any] = {}  # lazily built helpers (explain's labelled-example index)
        self.backend: dict[str, Any] = _describe_index(index, meta)

    @classmethod
    def open(cls, store: Store, model: "str | None" = None, exact_device: "str | None" = None) -> "Searcher":
        """Load the index (plus shards it does not cover yet, in memory) and the classifier NAME.

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
            todo = [s["name"] for s in store.manifest["shards"] if s["name"] not in set(meta["shards"])]
            add_shards(index, store, todo)
            searcher = cls(store, _to_gpu(index, meta["kind"]), meta)
        if model is not None:
            searcher.attach_model(model)
        return searcher

    def use_exact(self, device: str = "auto") -> None:
        """Search with `TorchExact` over every stored vector on DEVICE (the FAISS index is dropped)."""
        from .exact import TorchExact, resolve_device

        ids = self.table.column("id").to_numpy()
        self.index = TorchExact(ids, self.vectors(), resolve_device(device))
        self.backend = self.index.describe()

    def attach_model(self, name: str) -> None:
        """Use classifier NAME for p_nsfw (bulk scores when present) and its training labels."""
        from ..classifier.model import load_classifier

        classifier = load_classifier(self.store, name)
        self.store.check_space(classifier.space, f"model {name}")
        self.classifier = classifier
        self.labels = training_labels(self.store, name)

    @property
    def dim(self) -> int:
        return self.store.dim

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Store ids -> row positions in the item table (-1 where unknown)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids).clip(0, max(len(self._sorted_ids) - 1, 0))
        found = self._sorted_ids[pos] == ids if len(self._sorted_ids) else np.zeros(len(ids), bool)
        return np.where(found, self._order[pos], -1)

    def _row(self, item_id: int) -> int:
        row = int(self.rows_of(np.array([item_id]))[0])
        if row < 0:
            raise NotFound(f"id {item_id} is not in store {self.store.root}")
        return row

    def vectors(self) -> np.ndarray:
        """Every stored vector (fp16, item-table order), read on first use."""
        if self._vectors is None:
            self._vectors = self.store.vectors()[1]
        return self._vectors

    def vector_of(self, item_id: int) -> np.ndarray:
        return self.vectors()[self._row(item_id)].astype(np.float32)

    def p_nsfw_of_rows(self, rows: np.ndarray) -> "np.ndarray | None":
        """p_nsfw of stored rows: the bulk scores where scored, else computed (and kept) for just these rows."""
        from ..classifier.scoring import lookup_scores

        if self.classifier is None:
            return None
        if self._scores is None:
            ids = self.table.column("id").to_numpy()
            self._scores = np.asarray(lookup_scores(self.store, self.classifier.name, ids), dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        scores = self._scores[rows]
        missing = np.isnan(scores)
        if missing.any():
            scores[missing] = self.classifier.p_nsfw(self.vectors()[rows[missing]].astype(np.float32))
            self._scores[rows[missing]] = scores[missing]
        return scores

    def fill_scores(self, chunk: int = 65536) -> int:
        """p_nsfw of every row without a bulk score, computed now (so hits need no forward pass); the count."""
        if self.classifier is None:
            return 0
        self.p_nsfw_of_rows(np.zeros(0, np.int64))  # reads the bulk scores
        assert self._scores is not None
        missing, vectors = np.flatnonzero(np.isnan(self._scores)), self.vectors()
        for start in range(0, len(missing), chunk):
            rows = missing[start:start + chunk]
            self._scores[rows] = self.classifier.p_nsfw(vectors[rows].astype(np.float32))
        return int(len(missing))

    def search_arrays(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (n, k'), store ids (n, k')) of the nearest items, k' = min(k, ntotal); -1 ids: none."""
        k = check_k(k)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or not np.isfinite(vectors).all():
            raise BadInput(f"query vectors must be finite, of shape (n, {self.dim}); got {vectors.shape}")
        return self.index.search(np.ascontiguousarray(l2_normalize(vectors)), min(k, self.index.ntotal))

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
        uris = self.uris.take(rows.clip(0))
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
        return self.search_vectors(self.vector_of(item_id)[None, :], k)[0]

    def item(self, item_id: int) -> dict[str, Any]:
        """Metadata of a stored item (+ p_nsfw and training label with a model)."""
        row = self._row(item_id)
        item = self.table.slice(row, 1).to_pylist()[0]
        if self.classifier is not None:
            item["p_nsfw"] = float(self.p_nsfw_of_rows(np.array([row]))[0])
            item["label"] = self.labels.get(int(item_id))
        return item


def _describe_index(index: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """What searches run on, for /v1/stats: the FAISS index kind, on the CPU (all cores) or faiss' GPUs."""
    if index is None:
        return {}
    on_gpu = any(word in type(index).__name__ for word in ("Gpu", "Replicas", "Shards"))
    info = {"backend": "faiss", "kind": meta.get("kind"), "factory": meta.get("factory"),
            "device": "cuda" if on_gpu else "cpu", "ntotal": int(index.ntotal)}
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


def training_labels(store: Store, name: str) -> dict[int, str]:
    """id -> label of the examples model NAME was trained on (models/NAME.labels.parquet)."""
    import pyarrow.parquet as pq

    from ..classifier.model import model_paths

    path = model_paths(store, name)["labels"]
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["id", "label"])
    return dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))


def run_search(store_root: str, *, item_id: "int | None" = None, image: "str | None" = None,
               text: "str | None" = None, vector_file: "str | None" = None, k: int = 10,
               model: "str | None" = None, clip_model: "str | None" = None, device: str = "auto") -> list[Hit]:
    """`pnsfw search`: the k nearest items to a store id, an image file, a text or a .npy vector."""
    from .embed import query_vector

    k = check_k(k)
    searcher = Searcher.open(Store.open(store_root), model)
    if item_id is not None:
        return searcher.search_id(item_id, k)
    vector = query_vector(searcher.store, image=image, text=text, vector_file=vector_file,
                          clip_model=clip_model, device=device)
    return searcher.search_vectors(vector[None, :], k)[0]
