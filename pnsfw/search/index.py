"""The FAISS index over the store's vectors: inner product on unit vectors, store ids as FAISS ids.

Kinds: `flat` (exact), `hnsw` (graph), `ivfpq` (inverted lists of PQ codes), or
any FAISS factory string. `auto` picks by vector count and a memory budget,
the way autofaiss does, and `index.json` records the choice, its parameters,
the embedding space and the shards covered, so `update_index` can add new
shards without a rebuild (every kind here accepts adds once trained).
"""

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, StoreError
from ..progress import counted
from ..store import Store, artifacts
from ..store.maintenance import check_shards
from ..store.records import Generation

log = logging.getLogger(__name__)

FLAT_MAX_CPU = 300_000  # above this, exact CPU search costs > ~10 ms per query: go approximate
FLAT_MAX_GPU = 20_000_000  # exact fp16/fp32 GPU search stays in the ms range up to here
HNSW_MAX = 5_000_000  # HNSW build time grows past what one machine does in an hour beyond this
HNSW_M = 32
TRAIN_PER_LIST = 64  # rows sampled per IVF list to train (faiss wants >= 39)
TRAIN_MAX = 1_000_000
MERGE_AT_LOAD = True  # readers merge IVF/flat segments into one index (False: search each, merge the top-k)
MAX_SEGMENTS = 16  # an update that would leave more merges all segments after the base into its new one
REBUILD_RATIO = 1.0  # a trained kind is rebuilt (trained again) once its segments hold this many base rows


@dataclass(frozen=True)
class Plan:
    """What to build: a FAISS factory string and the parameters searches use."""

    kind: str
    factory: str
    search_params: str = ""
    train_size: int = 0


def read_meta(store: Store) -> "dict[str, Any] | None":
    """index.json of the store's current index generation (None without an index)."""
    return artifacts.index_meta(store)


def default_memory() -> int:
    """Half of the machine's RAM: the budget when --max-memory is not given."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _flat_plan(n: int, dim: int) -> Plan:
    return Plan("flat", "Flat")


def _hnsw_plan(n: int, dim: int) -> Plan:
    return Plan("hnsw", f"HNSW{HNSW_M}", "efSearch=128")


def _pq_bits(n: int) -> int:
    """8-bit PQ codes need 256 x 39 training rows; tiny stores get fewer bits."""
    return int(min(8, max(1, math.floor(math.log2(max(n, 78) / 39)))))


def _ivf_lists(n: int) -> int:
    """autofaiss' rule: about 4 sqrt(n) lists, a power of two, with >= 39 rows each."""
    target = min(4 * math.sqrt(max(n, 1)), max(n, 1) / 39)
    return 2 ** max(0, int(math.floor(math.log2(max(target, 1)))))


def _ivfpq_plan(n: int, dim: int, bytes_per_code: int = 0, refine: bool = False) -> Plan:
    """IVF-PQ; `refine` re-ranks candidates on fp16 copies (recall ~1 at half flat's memory)."""
    m = bytes_per_code or max(1, dim // 4)
    nlist = _ivf_lists(n)
    nprobe = min(nlist, max(16, nlist // 32))
    train = min(n, TRAIN_MAX, max(TRAIN_PER_LIST * nlist, 256 * 39))
    # "np": no polysemous training, which costs ~1 s per sub-quantizer and helps only Hamming filtering
    factory = f"IVF{nlist},PQ{m}x{_pq_bits(n)}np" + (",Refine(SQfp16)" if refine else "")
    return Plan("ivfpq", factory, f"nprobe={nprobe}" + (",k_factor_rf=8" if refine else ""), train)


KINDS: dict[str, Callable[[int, int], Plan]] = {"flat": _flat_plan, "hnsw": _hnsw_plan, "ivfpq": _ivfpq_plan}


def estimate_bytes(plan: Plan, n: int, dim: int) -> int:
    """Memory the index needs for n vectors (autofaiss-style estimate, ids included)."""
    per_vector = {"flat": dim * 4 + 8, "hnsw": dim * 4 + HNSW_M * 2 * 4 * 1.1 + 8}
    if plan.kind in per_vector:
        return int(n * per_vector[plan.kind])
    m = int(plan.factory.split(",PQ")[1].split("x")[0]) if ",PQ" in plan.factory else dim * 4
    m += dim * 2 if "Refine(SQfp16)" in plan.factory else 0
    return int(n * (m + 8) * 1.1 + _ivf_lists(n) * dim * 4)


def auto_plan(n: int, dim: int, max_memory: int, gpus: int = 0) -> Plan:
    """Flat while exact search is fast and fits, then HNSW, then IVF-PQ (+fp16 re-ranking) with the largest
    codes that fit."""
    flat = _flat_plan(n, dim)
    if n <= (FLAT_MAX_GPU if gpus else FLAT_MAX_CPU) and estimate_bytes(flat, n, dim) <= max_memory:
        return flat
    hnsw = _hnsw_plan(n, dim)
    if n <= HNSW_MAX and estimate_bytes(hnsw, n, dim) <= max_memory:
        return hnsw
    plans = [_ivfpq_plan(n, dim, refine=True)] + [_ivfpq_plan(n, dim, max(1, dim // d)) for d in (4, 8, 16, 32)]
    for plan in plans:
        if estimate_bytes(plan, n, dim) <= max_memory:
            return plan
    raise BadInput(f"{n:,} vectors do not fit in {max_memory / 1e9:.1f} GB even as IVF-PQ{dim // 32}; "
                   f"raise --max-memory")


def make_plan(kind: str, n: int, dim: int, max_memory: int, gpus: int = 0) -> Plan:
    """auto | flat | hnsw | ivfpq | a FAISS factory string, optionally `|search params` -> Plan."""
    if kind == "auto":
        return auto_plan(n, dim, max_memory, gpus)
    if kind in KINDS:
        return KINDS[kind](n, dim)
    factory, _, params = kind.partition("|")  # e.g. "IVF4096,PQ32x8np,Refine(SQfp16)|nprobe=64"
    return Plan("factory", factory.strip(), params.strip(), min(n, TRAIN_MAX))


def new_index(plan: Plan, dim: int) -> Any:
    """An empty index taking store ids: IVF kinds hold ids natively, others get an IDMap."""
    import faiss

    try:
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise BadInput(f"bad index kind {plan.factory!r}: {str(exc).splitlines()[0]}") from None
    # only a top-level IVF takes ids itself (an IVF inside a Refine or PreTransform does not)
    return index if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else faiss.IndexIDMap(index)


def set_search_params(index: Any, params: str) -> None:
    import faiss

    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]


def _batch_rows(batch: tuple[np.ndarray, np.ndarray]) -> int:
    return len(batch[0])


def _vectors(store: Store, progress: bool, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The store's (ids, vectors) batches, with a bar of rows read on a terminal."""
    return counted(store.iter_vectors(), progress, store.rows, _batch_rows, "rows", desc)


def _sample(store: Store, count: int, seed: int = 0, progress: bool = False) -> np.ndarray:
    """About `count` rows drawn uniformly from the whole store, streamed."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, count / max(store.rows, 1))
    parts = [v[rng.random(len(v)) < keep] for _, v in _vectors(store, progress, "sample")]
    return np.ascontiguousarray(np.concatenate(parts)[:count], dtype=np.float32)


def _train(index: Any, sample: Callable[[int], np.ndarray], plan: Plan, gpus: int) -> None:
    """Train when the kind needs it, on `sample(count)` rows (the coarse k-means on GPUs when present)."""
    import faiss

    if index.is_trained:
        return
    rows = sample(plan.train_size)
    log.info("training %s on %s vectors", plan.factory, f"{len(rows):,}")
    ivf = faiss.try_extract_index_ivf(index)
    if gpus and ivf is not None:  # k-means of the coarse quantizer on the GPU
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    try:
        index.train(rows)
    except RuntimeError as exc:
        raise BadInput(f"cannot train {plan.factory} on {len(rows):,} vectors: {str(exc).splitlines()[0]}") from None


def add_shards(index: Any, store: Store, names: list[str]) -> int:
    """Stream the named shards into the index; returns the rows added."""
    added = 0
    for ids, vectors in store.iter_vectors([store.shard(n) for n in names]):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        added += len(ids)
    return added


def save_index(store: Store, index: Any, meta: dict[str, Any], base: "Generation | None") -> bool:
    """Commit the index and its metadata as one one-file generation (False: another writer's index won
    meanwhile); the older format, which readers and `update_index` still take."""
    import faiss

    return artifacts.commit_index(store, lambda path: faiss.write_index(index, str(path)), meta, base)


def _writer(index: Any) -> Callable[[Path], None]:
    import faiss

    return lambda path: faiss.write_index(index, str(path))


def _lists_writer(ivf: Any) -> Callable[[Path], None]:
    """Writes only the inverted lists of an IVF segment (its quantizer and codebooks are the trained part's)."""
    import faiss

    def write(path: Path) -> None:
        out = faiss.FileIOWriter(str(path))
        faiss.write_InvertedLists(ivf.invlists, out)
        del out  # closes the file

    return write


def _read_lists(store: Store, entry: dict[str, Any]) -> Any:
    import faiss

    path = artifacts.segment_path(store, entry)
    try:
        source = faiss.FileIOReader(str(path))
        lists = faiss.read_InvertedLists(source)
        del source
    except RuntimeError as exc:
        raise StoreError(f"cannot read index {path}: {str(exc).splitlines()[0][:120]}; "
                         f"run `pnsfw repair --store {store.root}`") from None
    return lists


def _read(store: Store, entry: dict[str, Any], flags: int = 0) -> Any:
    import faiss

    path = artifacts.segment_path(store, entry)
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise StoreError(f"cannot read index {path}: {str(exc).splitlines()[0][:120]}; "
                         f"run `pnsfw repair --store {store.root}`") from None


def _merge_into(first: Any, part: Any) -> bool:
    """Move part's rows into first (IVF: its inverted lists; flat: its codes), store ids kept; False when
    FAISS cannot (HNSW, Refine, ...: checked before anything moves)."""
    try:
        first.merge_from(part, 0)
        return True
    except RuntimeError:
        return False


def _searched_apart(parts: list[Any]) -> Any:
    """One index over parts that cannot merge: each searched, their top-k merged (IndexShards)."""
    import faiss

    if len(parts) == 1:
        return parts[0]
    shards = faiss.IndexShards(parts[0].d, False, False)  # type: ignore[call-arg]  # (d, threaded, successive_ids)
    shards.metric_type = faiss.METRIC_INNER_PRODUCT
    for part in parts:
        shards.add_shard(part)
    return shards


def load_index(store: Store, merge: "bool | None" = None) -> tuple[Any, dict[str, Any]]:
    """The saved index (search parameters applied) and its index.json; refuses another space. Every segment of
    the generation is read and they answer as one index: merged into the first where FAISS can and `merge`
    (default MERGE_AT_LOAD), else searched apart."""
    meta = read_meta(store)
    if meta is None:
        raise StoreError(f"store {store.root} has no index (run `pnsfw reindex --store {store.root}`)")
    store.check_space(meta["space"], "the index")
    merge = MERGE_AT_LOAD if merge is None else merge
    parts: list[Any] = []
    for entry in artifacts.index_segments(store, meta):  # one at a time: at most one part beside the rest
        if entry.get("lists") and merge:  # an IVF segment's lists: straight into the base's
            parts[0].invlists.merge_from(_read_lists(store, entry), 0)
            parts[0].ntotal += int(entry["rows"])
            continue
        part = _ivf_part(store, meta, entry) if entry.get("lists") else _read(store, entry)
        set_search_params(part, meta.get("search_params", ""))
        if not (parts and merge and _merge_into(parts[0], part)):
            parts.append(part)
    return _searched_apart(parts), meta


def _ivf_part(store: Store, meta: dict[str, Any], entry: dict[str, Any]) -> Any:
    """An IVF index of one lists-only segment: the trained part with the segment's lists."""
    trained = artifacts.trained_part(store, meta)
    assert trained is not None, "a lists-only segment without a trained part"
    ivf = _read(store, trained)
    lists = _read_lists(store, entry)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) them now
    ivf.ntotal = int(entry["rows"])
    return ivf


def _meta(store: Store, plan: Plan, spec: str, max_memory: int, index: Any, shards: list[str]) -> dict[str, Any]:
    return dict(asdict(plan), spec=spec, max_memory=max_memory, metric="inner_product", space=store.space,
                dim=store.dim, ntotal=int(index.ntotal), shards=shards, gpus=gpu_count(), updated=time.time())


def trained_index(plan: Plan, dim: int, sample: Callable[[int], np.ndarray]) -> Any:
    """An empty index of `plan`, trained on sample(count) rows when the kind needs it."""
    index = new_index(plan, dim)
    _train(index, sample, plan, gpu_count())
    return index


def _add(index: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    for ids, vectors in batches:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)


def fill_index(plan: Plan, dim: int, sample: Callable[[int], np.ndarray],
               batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Any:
    """New index of `plan`, trained on sample(count) rows, holding every (ids, vectors) batch."""
    index = trained_index(plan, dim, sample)
    _add(index, batches)
    set_search_params(index, plan.search_params)
    return index


def create_index(store: Store, plan: Plan, progress: bool = False) -> Any:
    """A trained index holding every committed vector of the store (in memory, not saved); progress: bars
    for the training sample's read and the adding pass."""
    return fill_index(plan, store.dim, lambda count: _sample(store, count or store.rows, progress=progress),
                      _vectors(store, progress, "add"))


def build_index(store: Store, kind: str = "auto", max_memory: "int | None" = None,
                progress: bool = False) -> dict[str, Any]:
    """Build the index from every shard (a full rebuild) and save it as one segment (plus, for kinds that
    train, the trained empty index later updates start from); returns a summary."""
    import faiss

    started = time.perf_counter()
    if not store.rows:
        raise StoreError(f"store {store.root} has no vectors to index")
    budget = max_memory or default_memory()
    plan = make_plan(kind, store.rows, store.dim, budget, gpu_count())
    names = [s.name for s in store.shards]
    base = store.manifest.index
    index = new_index(plan, store.dim)
    untrained = not index.is_trained
    _train(index, lambda count: _sample(store, count or store.rows, progress=progress), plan, gpu_count())
    trained = _writer(faiss.clone_index(index)) if untrained else None
    _add(index, _vectors(store, progress, "add"))
    meta = _meta(store, plan, kind, budget, index, names)
    artifacts.commit_segments(store, meta, base, [], artifacts.NewSegment(_writer(index), int(index.ntotal), names),
                              trained)
    return {"kind": plan.kind, "factory": plan.factory, "search_params": plan.search_params,
            "ntotal": int(index.ntotal), "added": int(index.ntotal), "rebuilt": True, "segments": 1,
            "seconds": round(time.perf_counter() - started, 3)}


def reindex(store_root: "str | Path", kind: str = "auto", max_memory: "int | None" = None,
            progress: bool = False) -> dict[str, Any]:
    """`pnsfw reindex`: rebuild under the store's write lock (progress: bars on stderr)."""
    store = Store.open(store_root)
    with store.writer():
        check_shards(store)
        return build_index(store, kind, max_memory, progress)


def _needs_rebuild(store: Store, meta: "dict[str, Any] | None", names: list[str]) -> bool:
    if meta is None or meta.get("space") != store.space or not set(meta["shards"]) <= set(names):
        return True
    if meta.get("spec", "flat") != "auto":
        return False
    # an auto choice made for a smaller store is re-made when the store outgrows it
    wanted = auto_plan(store.rows, store.dim, meta["max_memory"], gpu_count())
    return (wanted.kind, wanted.factory) != (meta["kind"], meta["factory"])


def _outgrown(meta: dict[str, Any], segments: list[dict[str, Any]], adding: int) -> bool:
    """A kind that trains (IVF: its quantizer and codebooks) is trained again once the rows added after the
    base reach REBUILD_RATIO x the base's (a full rebuild per doubling: O(1) amortised work per row)."""
    if meta.get("kind") in ("flat", "hnsw"):
        return False
    later = sum(int(s["rows"]) for s in segments[1:]) + adding
    return later >= REBUILD_RATIO * max(int(segments[0]["rows"]), 1)


def empty_like(store: Store, meta: dict[str, Any], base: dict[str, Any]) -> tuple[Any, bool]:
    """An empty index sharing the generation's training (quantizer, codebooks) and whether it was derived
    from the base segment (a one-file generation keeps no trained part): reads the trained part only, never
    the base's rows (IVF: the base with its inverted lists mapped, not read; other kinds that train: the
    whole base, once)."""
    import faiss

    trained = artifacts.trained_part(store, meta)
    if trained is not None:
        return _read(store, trained), False
    plan = Plan(meta["kind"], meta["factory"], meta.get("search_params", ""), int(meta.get("train_size", 0)))
    empty = new_index(plan, int(meta["dim"]))
    if empty.is_trained:  # flat, HNSW: nothing learnt from the data
        return empty, False
    index = _read(store, base, faiss.IO_FLAG_MMAP)
    if isinstance(index, faiss.IndexIVF):  # its lists only mapped, never read: give it empty ones
        lists = faiss.ArrayInvertedLists(index.nlist, index.code_size)
        index.replace_invlists(lists, True)
        lists.this.disown()  # type: ignore[attr-defined]  # the index owns (and frees) them now
    else:  # not a top-level IVF: its rows are elsewhere too (Refine, IDMap), read it whole once
        index = _read(store, base)
    index.reset()
    return index, True


def _plan_segments(segments: list[dict[str, Any]], todo: list[str],
                   rows: dict[str, int]) -> tuple[list[dict[str, Any]], list[str]]:
    """(segments kept as they are, shards of the new segment): the new shards, plus the segments after the base
    that hold no more rows than the new one (merged into it, the way a binary counter carries), plus all of
    them when more than MAX_SEGMENTS would be left. Merging reads those segments' rows from their shards,
    never the base's."""
    kept, shards = list(segments), list(todo)
    adding = sum(rows[n] for n in todo)
    while len(kept) > 1 and (int(kept[-1]["rows"]) <= adding or len(kept) >= MAX_SEGMENTS):
        merged = kept.pop()
        shards = list(merged["shards"]) + shards
        adding += int(merged["rows"])
    return kept, shards


def update_index(store: Store) -> dict[str, Any]:
    """Add shards the index does not cover yet as a new segment (nothing trained, the base neither read nor
    rewritten); rebuild if missing, from another space, outgrown, or grown past REBUILD_RATIO x its base."""
    started = time.perf_counter()
    meta = read_meta(store)
    names = [s.name for s in store.shards]
    if _needs_rebuild(store, meta, names):
        if meta is None or meta.get("space") != store.space:
            return build_index(store, "auto", None)
        return build_index(store, meta.get("spec", "auto"), meta.get("max_memory"))
    assert meta is not None
    covered = set(meta["shards"])
    todo = [n for n in names if n not in covered]
    segments = artifacts.index_segments(store, meta)
    summary = {"kind": meta["kind"], "factory": meta.get("factory", ""), "ntotal": int(meta["ntotal"]),
               "added": 0, "rebuilt": False, "segments": len(segments)}
    if not todo:
        return dict(summary, seconds=round(time.perf_counter() - started, 3))
    rows = {s.name: s.rows for s in store.shards}
    if _outgrown(meta, segments, sum(rows[n] for n in todo)):
        log.info("index segments reached %.1fx the base's rows: rebuilding", REBUILD_RATIO)
        return build_index(store, meta.get("spec", "auto"), meta.get("max_memory"))
    kept, shards = _plan_segments(segments, todo, rows)
    done = _commit_segment(store, meta, kept, shards, todo)
    return dict(summary, **done, seconds=round(time.perf_counter() - started, 3))


def _commit_segment(store: Store, meta: dict[str, Any], kept: list[dict[str, Any]], shards: list[str],
                    todo: list[str]) -> dict[str, Any]:
    """Build the segment of `shards` from the generation's trained empty index and commit it after `kept`."""
    import faiss

    base = store.manifest.index
    segments = artifacts.index_segments(store, meta)
    segment, derived = empty_like(store, meta, segments[0])
    trained = _writer(faiss.clone_index(segment)) if derived else artifacts.trained_part(store, meta)
    added = add_shards(segment, store, shards)
    ntotal = int(meta["ntotal"]) - sum(int(s["rows"]) for s in segments[len(kept):]) + added
    new_meta = dict(meta, ntotal=ntotal, shards=meta["shards"] + todo, updated=time.time())
    lists = trained is not None and isinstance(segment, faiss.IndexIVF)  # quantizer and codebooks: shared
    new = artifacts.NewSegment(_lists_writer(segment) if lists else _writer(segment), added, shards, lists)
    artifacts.commit_segments(store, new_meta, base, kept, new, trained)
    return {"ntotal": ntotal, "added": sum(s.rows for s in store.shards if s.name in set(todo)),
            "segments": len(kept) + 1, "merged": len(segments) - len(kept)}
