"""Near-duplicate groups over the whole store: connected components of pairs with cosine >= T.

Pairs come in batches and are folded into components as they arrive, so memory
stays O(n) however many pairs there are. Three pair finders:
`exact-gpu` (the tiled GEMM kernel of exact.py / tiles.py on CUDA: only groups of rows whose best
similarity reaches T are scored again, only pairs above T leave the GPU), `exact` (FAISS range search,
CPU), and `knn` (the store's FAISS index, k neighbours each, re-checked exactly) for stores too large
for exact all-pairs work on a CPU.

Every row of a group carries its nearest other member and their similarity (a pair that reached T),
and the group's suggested keeper: the largest image (width x height; rows without a size count as 0),
ties to the lowest id, with each row's similarity to it.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInput, StoreError
from ..progress import progress_bar
from ..store import Store
from ..userio import check_output, write_table

Pairs = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (row i, row j, similarity) arrays, i < j
QUERY_BATCH = 4096
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


class Nearest:
    """Each row's most similar partner among the pairs seen so far (-1 / -inf: none)."""

    def __init__(self, n: int):
        self.row = np.full(n, -1, np.int64)
        self.similarity = np.full(n, -np.inf, np.float32)

    def add(self, i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> None:
        a, b = np.concatenate([i, j]), np.concatenate([j, i])
        s = np.concatenate([sim, sim]).astype(np.float32)
        order = np.lexsort((-s, a))
        a, b, s = a[order], b[order], s[order]
        first = np.r_[True, a[1:] != a[:-1]] if len(a) else np.zeros(0, bool)
        a, b, s = a[first], b[first], s[first]
        better = s > self.similarity[a]
        self.row[a[better]], self.similarity[a[better]] = b[better], s[better]


def _nothing(rows: int) -> None:
    pass


def exact_cpu_pairs(vectors: np.ndarray, threshold: float, advance: Callable[[int], None] = _nothing,
                    **_: Any) -> Pairs:
    """FAISS range search of every row against all rows, a batch of queries at a time; advance(rows) after
    each batch of query rows."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for start in range(0, len(vectors), QUERY_BATCH):
        lims, sims, found = index.range_search(vectors[start:start + QUERY_BATCH], threshold)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)).astype(np.int64))
        keep = found > rows
        yield rows[keep], found[keep], sims[keep]
        advance(len(lims) - 1)


def exact_torch_pairs(vectors: Any, threshold: float, device: str = "cuda", kernel: str = "auto",
                      block_rows: "int | None" = None, advance: Callable[[int], None] = _nothing,
                      **_: Any) -> Pairs:
    """GEMM tiles of the upper triangle on `device` (exact.py / tiles.py); only pairs above the threshold
    leave it. `vectors` may already be a tensor on the device (no copy then)."""
    import torch

    from .exact import QUERY_BLOCK, SCORES_BUDGET, padded_rows, resolve_devices, resolve_kernel
    from .tiles import GROUP, pairs_above

    dev = resolve_devices(device)[0]
    data = padded_rows(vectors, dev, torch.float16 if dev.type == "cuda" else torch.float32, pin=False)
    n, kernel = len(vectors), resolve_kernel(kernel, dev, vectors.shape[1])
    rows = block_rows or int(SCORES_BUDGET / (QUERY_BLOCK * (4 / GROUP if kernel == "triton" else 6)))
    rows = max(GROUP, rows // GROUP * GROUP)
    with torch.inference_mode():
        for start in range(0, n, QUERY_BLOCK):
            q = data[start:min(start + QUERY_BLOCK, n)]
            q32 = q.to(torch.float32)
            for col in range(start, n, rows):
                for qi, row, sim in pairs_above(q, q32, data[col:col + rows], min(rows, n - col), threshold, kernel):
                    i, j = qi + start, row + col
                    keep = j > i
                    yield i[keep].cpu().numpy(), j[keep].cpu().numpy(), sim[keep].cpu().numpy()
            advance(len(q))


def knn_pairs(vectors: np.ndarray, threshold: float, store: Store, neighbours: int = 32,
              advance: Callable[[int], None] = _nothing, **_: Any) -> Pairs:
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
        yield rows[keep], found[keep], exact[keep]
        advance(len(batch))


METHODS: dict[str, Callable[..., Pairs]] = {"exact": exact_cpu_pairs, "exact-gpu": exact_torch_pairs,
                                            "knn": knn_pairs}


def pick_method(method: str, n: int) -> str:
    """auto: the GPU kernel when torch sees CUDA, else FAISS range search up to EXACT_CPU_MAX rows, else kNN."""
    if method != "auto" and method not in METHODS:
        raise BadInput(f"unknown dedup method {method!r} (auto, {', '.join(METHODS)})")
    if method in ("exact", "knn"):
        return method
    import torch

    if torch.cuda.is_available():
        return "exact-gpu"
    if method == "exact-gpu":
        raise BadInput("--method exact-gpu needs a CUDA GPU that torch can see")
    return "exact" if n <= EXACT_CPU_MAX else "knn"


@dataclass
class Duplicates:
    """Per store row: its group (-1: none), its nearest other member (row, -1: none) and their similarity."""

    groups: np.ndarray
    nearest: np.ndarray
    similarity: np.ndarray
    method: str


def group_pairs(n: int, pairs: Pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group per row numbered by first appearance or -1, nearest partner row, its similarity) from pairs."""
    components, nearest = Components(n), Nearest(n)
    for i, j, sim in pairs:
        components.add(i, j)
        nearest.add(i, j, sim)
    labels = components.labels()
    grouped = np.bincount(labels)[labels] > 1
    groups = np.full(n, -1, np.int64)
    groups[grouped] = _renumber(labels[grouped])
    return groups, nearest.row, nearest.similarity


def find_groups(store: Store, threshold: float, method: str = "auto", neighbours: int = 32,
                vectors: "np.ndarray | None" = None, progress: bool = False) -> Duplicates:
    """Near-duplicate groups of the store's rows (see `Duplicates`) and the method used; `vectors`: the
    store's, when the caller has read them already; progress: a bar of query rows done on stderr."""
    if not 0.0 < threshold <= 1.0:
        raise BadInput(f"--threshold must be in (0, 1], got {threshold}")
    if not store.exists or not store.rows:
        raise StoreError(f"store {store.root} is empty")
    if vectors is None:
        vectors = store.vectors()[1]  # fp16; each method widens only what it needs
    method = pick_method(method, len(vectors))
    # fp16 storage rounds exact copies' self-similarity to ~1 +- 1e-3: allow that slack at the top
    with progress_bar(progress, len(vectors), "rows", f"dedup ({method})") as bar:
        pairs = METHODS[method](vectors, min(threshold, 1.0 - 2e-3), store=store, neighbours=neighbours,
                                advance=bar.update)
        return Duplicates(*group_pairs(len(vectors), pairs), method=method)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Group numbers in order of each group's first row."""
    _, first_pos, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first_pos), np.int64)
    rank[np.argsort(first_pos)] = np.arange(len(first_pos))
    return rank[inverse]


def keepers(groups: np.ndarray, ids: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Row of each row's suggested keeper (-1 outside groups): the group's largest image, ties to the lowest id."""
    rows = np.flatnonzero(groups >= 0)
    order = rows[np.lexsort((ids[rows], -area[rows], groups[rows]))]
    first = np.r_[True, groups[order][1:] != groups[order][:-1]] if len(order) else np.zeros(0, bool)
    keeper_of_group = np.empty(int(groups.max()) + 1 if len(rows) else 0, np.int64)
    keeper_of_group[groups[order[first]]] = order[first]
    out = np.full(len(groups), -1, np.int64)
    out[rows] = keeper_of_group[groups[rows]]
    return out


TABLES = (".parquet", ".pq", ".csv", ".jsonl")  # a uri list (.txt) would lose the groups
COLUMNS = ["group", "id", "uri", "keep", "keeper", "keeper_similarity", "nearest", "similarity"]


def duplicates_table(store: Store, found: Duplicates, vectors: "np.ndarray | None") -> Any:
    """One row per image in a group (COLUMNS), sorted by group, then keeper first, then id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = store.table(["id", "uri", "width", "height"])
    ids = table.column("id").to_numpy()
    width, height = (pc.fill_null(table.column(c), 0).to_numpy().astype(np.int64) for c in ("width", "height"))
    keeper = keepers(found.groups, ids, width * height)
    rows = np.flatnonzero(found.groups >= 0)
    vectors = np.zeros((len(ids), 1), np.float32) if vectors is None else vectors  # an empty store
    rows = rows[np.lexsort((ids[rows], keeper[rows] != rows, found.groups[rows]))]
    mine, theirs = vectors[rows].astype(np.float32), vectors[keeper[rows]].astype(np.float32)
    return pa.table({"group": found.groups[rows], "id": ids[rows], "uri": table.column("uri").take(rows),
                     "keep": keeper[rows] == rows, "keeper": ids[keeper[rows]],
                     "keeper_similarity": np.einsum("nd,nd->n", mine, theirs),
                     "nearest": ids[found.nearest[rows]], "similarity": found.similarity[rows]})


def dedup(store_root: str, out: str, threshold: float = 0.95, method: str = "auto",
          neighbours: int = 32, progress: bool = False) -> dict[str, Any]:
    """`pnsfw dedup`: write COLUMNS for every row in a near-duplicate group to OUT (.parquet/.csv); progress:
    a bar on stderr."""
    started = time.perf_counter()
    check_output(out, TABLES)
    store = Store.open(store_root)
    vectors = store.vectors()[1] if store.exists else None
    found = find_groups(store, threshold, method, neighbours, vectors, progress)
    result = duplicates_table(store, found, vectors)
    write_table(result, out, TABLES)
    groups = int(found.groups.max() + 1) if result.num_rows else 0
    return {"rows": int(len(found.groups)), "groups": groups, "duplicates": int(result.num_rows),
            "removable": int(result.num_rows) - groups, "method": found.method, "threshold": threshold, "out": out,
            "seconds": round(time.perf_counter() - started, 3)}
