"""Near-duplicate groups over the whole store: connected components of pairs with cosine >= T.

Pairs come in batches and are folded into components as they arrive, so memory
stays O(n) however many pairs there are. Three pair finders:
`exact-gpu` (torch fp16 tiles on CUDA), `exact` (FAISS range search, CPU), and
`knn` (the store's FAISS index, k neighbours each, re-checked exactly) for
stores too large for exact all-pairs work on a CPU.
"""

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, StoreError
from ..store import Store
from ..store.files import atomic_write

Pairs = Iterator[tuple[np.ndarray, np.ndarray]]  # (row i, row j) arrays, i < j
QUERY_BATCH = 4096
GPU_TILE = 1 << 28  # similarity entries per GPU tile (512 MB in fp16)
EXACT_CPU_MAX = 300_000
COMPRESS_EDGES = 1 << 24


class Components:
    """Union of edges into connected components, compressed to a forest when edges pile up."""

    def __init__(self, n: int):
        self.n = n
        self.src: list[np.ndarray] = []
        self.dst: list[np.ndarray] = []
        self.edges = 0

    def add(self, i: np.ndarray, j: np.ndarray) -> None:
        self.src.append(np.asarray(i, np.int64))
        self.dst.append(np.asarray(j, np.int64))
        self.edges += len(i)
        if self.edges > COMPRESS_EDGES:
            labels = self.labels()
            nodes = np.arange(self.n)
            first = np.full(self.n, self.n, np.int64)
            np.minimum.at(first, labels, nodes)
            keep = first[labels] != nodes
            self.src, self.dst, self.edges = [nodes[keep]], [first[labels][keep]], int(keep.sum())

    def labels(self) -> np.ndarray:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        src = np.concatenate(self.src) if self.src else np.zeros(0, np.int64)
        dst = np.concatenate(self.dst) if self.dst else np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(self.n, self.n))
        return connected_components(graph, directed=False)[1]


def exact_cpu_pairs(vectors: np.ndarray, threshold: float, **_: Any) -> Pairs:
    """FAISS range search of every row against all rows, a batch of queries at a time."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for start in range(0, len(vectors), QUERY_BATCH):
        lims, _, found = index.range_search(vectors[start:start + QUERY_BATCH], threshold)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = found > rows
        yield rows[keep], found[keep]


def exact_gpu_pairs(vectors: np.ndarray, threshold: float, **_: Any) -> Pairs:
    """Torch fp16 tiles on CUDA: only the upper triangle, only pairs above the threshold leave the GPU."""
    import torch

    data = torch.as_tensor(vectors, dtype=torch.float16, device="cuda")
    n = len(data)
    cols = max(QUERY_BATCH, GPU_TILE // QUERY_BATCH)
    for start in range(0, n, QUERY_BATCH):
        query = data[start:start + QUERY_BATCH]
        for col in range(start, n, cols):
            sims = query @ data[col:col + cols].T
            i, j = torch.nonzero(sims >= threshold, as_tuple=True)
            i, j = i + start, j + col
            keep = j > i
            yield i[keep].cpu().numpy(), j[keep].cpu().numpy()


def knn_pairs(vectors: np.ndarray, threshold: float, store: Store, neighbours: int = 32, **_: Any) -> Pairs:
    """The store's FAISS index gives candidates; each is re-checked with the exact dot product."""
    from .query import Searcher

    searcher = Searcher.open(store)
    for start in range(0, len(vectors), QUERY_BATCH):
        batch = np.ascontiguousarray(vectors[start:start + QUERY_BATCH], dtype=np.float32)
        _, ids = searcher.index.search(batch, min(neighbours, searcher.index.ntotal))
        rows = np.repeat(np.arange(start, start + len(batch)), ids.shape[1])
        found = searcher.rows_of(ids.reshape(-1))
        valid = found > rows
        rows, found = rows[valid], found[valid]
        exact = np.einsum("ij,ij->i", vectors[rows].astype(np.float32), vectors[found].astype(np.float32))
        keep = exact >= threshold
        yield rows[keep], found[keep]


METHODS: dict[str, Callable[..., Pairs]] = {"exact": exact_cpu_pairs, "exact-gpu": exact_gpu_pairs, "knn": knn_pairs}


def pick_method(method: str, n: int) -> str:
    if method != "auto":
        if method not in METHODS:
            raise BadInput(f"unknown dedup method {method!r} (auto, {', '.join(METHODS)})")
        return method
    import torch

    if torch.cuda.is_available():
        return "exact-gpu"
    return "exact" if n <= EXACT_CPU_MAX else "knn"


def find_groups(store: Store, threshold: float, method: str = "auto", neighbours: int = 32) -> tuple[np.ndarray, str]:
    """Group number per store row (-1: no near-duplicate), numbered by first appearance; and the method used."""
    if not 0.0 < threshold <= 1.0:
        raise BadInput(f"--threshold must be in (0, 1], got {threshold}")
    if not store.exists or not store.rows:
        raise StoreError(f"store {store.root} is empty")
    vectors = store.vectors()[1]  # fp16; each method widens only what it needs
    method = pick_method(method, len(vectors))
    components = Components(len(vectors))
    # fp16 storage rounds exact copies' self-similarity to ~1 +- 1e-3: allow that slack at the top
    for i, j in METHODS[method](vectors, min(threshold, 1.0 - 2e-3), store=store, neighbours=neighbours):
        components.add(i, j)
    labels = components.labels()
    sizes = np.bincount(labels)
    grouped = sizes[labels] > 1
    groups = np.full(len(labels), -1, np.int64)
    groups[grouped] = _renumber(labels[grouped])
    return groups, method


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Group numbers in order of each group's first row."""
    _, first_pos, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first_pos), np.int64)
    rank[np.argsort(first_pos)] = np.arange(len(first_pos))
    return rank[inverse]


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def _write_csv(table: Any, path: Path) -> None:
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, path)


WRITERS: dict[str, Callable[[Any, Path], None]] = {".parquet": _write_parquet, ".csv": _write_csv}


def dedup(store_root: str, out: str, threshold: float = 0.95, method: str = "auto",
          neighbours: int = 32) -> dict[str, Any]:
    """`pnsfw dedup`: write (group, id, uri) for every row in a near-duplicate group to OUT (.parquet/.csv)."""
    import pyarrow as pa

    started = time.perf_counter()
    writer = WRITERS.get(Path(out).suffix.lower())
    if writer is None:
        raise BadInput(f"--out must end in {' or '.join(WRITERS)}, got {out}")
    store = Store.open(store_root)
    groups, used = find_groups(store, threshold, method, neighbours)
    table = store.table(["id", "uri"])
    rows = np.flatnonzero(groups >= 0)
    rows = rows[np.lexsort((table.column("id").to_numpy()[rows], groups[rows]))]
    result = pa.table({"group": pa.array(groups[rows]), "id": table.column("id").take(rows),
                       "uri": table.column("uri").take(rows)})
    atomic_write(Path(out), lambda tmp: writer(result, tmp))
    return {"rows": int(len(groups)), "groups": int(groups.max() + 1) if len(rows) else 0,
            "duplicates": int(len(rows)), "method": used, "threshold": threshold, "out": out,
            "seconds": round(time.perf_counter() - started, 3)}
