"""`pnsfw import`: embeddings other tools computed -> store shards (reader -> mapper -> writer), overlapped.

Reader (a thread of its own, READ_AHEAD chunks ahead): the layouts of import_layouts.py, in units streamed from
the row where the store's commits of that unit end (so a rerun resumes, and a second import adds nothing).
Mappers (min(6, cores // 3) threads, at least 1; results in order): rows validated (width, finite,
non-zero norm; the others become error rows with a reason), L2-normalised (unitvec.py: unit-length fp16 rows
checked in numpy and kept, so such an import never imports torch; rows to rescale by torch), projected, uri_hash
computed (with more than one mapper in numpy lanes, store/urihash.py: the GIL released inside each numpy call,
so the mappers hash in parallel; with one, hashlib, which costs less CPU but holds the GIL).
Writer (the calling thread cuts): shards of `shard_size` rows, each staged (Parquet write,
checksum, fsync) by a pool of threads and committed through the store's writer by one commit thread in stream
order, each a prefix of the stream, so a crash at any moment then a rerun gives the rows and ids of an
uninterrupted run. Every queue between them is bounded.
"""

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..concurrency import background, cpu_count, ordered_map
from ..errors import BadInput, SpaceMismatch
from ..store import Projection, Store, StoreWriter
from ..store.shards import ERROR_SCHEMA, embedding_array, uri_hash
from ..store.writer import StagedCommit
from .import_layouts import Chunk, Unit, open_units
from .ingest import IngestOptions
from .projection import check_projection_option, make_projection
from .sources import meta_name
from .unitvec import unit_rows

log = logging.getLogger("pnsfw.indexer")
KNOWN_WIDTHS = {"RN50": 1024, "RN101": 512, "RN50x4": 640, "RN50x16": 768, "RN50x64": 1024, "ViT-B/32": 512,
                "ViT-B/16": 512, "ViT-L/14": 768, "ViT-L/14@336px": 768}
DEFAULT_FOR_WIDTH = {512: "ViT-B/32", 768: "ViT-L/14"}
READ_AHEAD = 2  # chunks read and waiting for the mapper


@dataclass
class ImportOptions(IngestOptions):
    """Options of `pnsfw import`; a new store's defaults: the model by width (DEFAULT_FOR_WIDTH), projection none."""

    layout: str = "auto"
    embedding_column: str | None = None
    shard_size: int = 50_000  # as `index` writes them: the bulk scorer reads both alike
    chunk_rows: int = 65_536
    stage_threads: int = 0  # shards written at once while the next are read; 0: min(4, cores)
    map_threads: int = 0  # chunks validated, normalised and hashed at once; 0: min(6, cores // 3), at least 1
    hash_lanes: bool | None = None  # uri_hash in numpy lanes (no GIL, more CPU); None: with > 1 map thread


@dataclass
class ImportSummary:
    imported: int = 0
    already_present: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    units: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.imported / self.seconds if self.seconds else 0.0


def declared_encoder(model: str, width: int) -> dict[str, Any]:
    """The encoder record of a declared model: its real fingerprint when pnsfw knows it (a CLIP name or a
    checkpoint file), so `search --text` can load it; else a fingerprint of the name alone."""
    import hashlib

    from .encoder import known_fingerprint  # here: encoder.py imports PIL, which an import needs nowhere else

    known = KNOWN_WIDTHS.get(model)
    if known is not None and known != width:
        raise BadInput(f"the embeddings have width {width}, but CLIP {model} makes {known}-d ones; pass the right "
                       "--model")
    fingerprint = known_fingerprint(model) or "declared-" + hashlib.sha256(model.encode()).hexdigest()[:40]
    return {"name": model, "fingerprint": fingerprint, "resolution": None, "width": width, "declared": True}


def _model_for(store: Store, options: ImportOptions, width: int) -> str:
    recorded = store.encoder if store.exists else None
    if options.model:
        return options.model
    if recorded:
        return str(recorded["name"])
    if width in DEFAULT_FOR_WIDTH:
        return DEFAULT_FOR_WIDTH[width]
    raise BadInput(f"embeddings of width {width}: name the CLIP model that made them with --model")


def _space(writer: StoreWriter, options: ImportOptions, width: int, sample: np.ndarray) -> Projection:
    """The store's projection (checked against --model/--projection), or a new space recorded now."""
    store = writer.store
    encoder = declared_encoder(_model_for(store, options, width), width)
    if store.projection_info:
        projection = store.projection()
        if projection.width != width:
            raise SpaceMismatch(f"store {store.root} holds embeddings of width {projection.width}, these have {width}")
        check_projection_option(writer, options.projection)
        writer.set_space(encoder, projection)  # refuses another model
        return projection
    projection = make_projection(options.projection or "none", width, sample, options.seed)
    writer.set_space(encoder, projection)
    return projection


def committed_offsets(store: Store) -> Counter[str]:
    """Rows + error rows already committed per source (each unit's commits are a prefix of it)."""
    counts: Counter[str] = Counter()
    if not store.exists:
        return counts
    for table in (store.table(["source"]), store.errors().select(["source"])):
        if table.num_rows:
            for item in pc.value_counts(table.column("source").combine_chunks()).to_pylist():
                counts[item["values"]] += item["counts"]
    return counts


# ---- mapper: one chunk -> (rows without ids, error rows)
REASONS = {1: "wrong width", 2: "not finite", 3: "zero vector", 4: "no uri"}


def _matrix(embeddings: np.ndarray, width: int, code: np.ndarray) -> np.ndarray:
    """(n, width) floats as they came (no copy when dense); rows of another width are marked (code 1), left zero."""
    if embeddings.dtype == object:
        lengths = np.array([len(row) for row in embeddings])
        code[lengths != width] = 1
        out = np.zeros((len(embeddings), width), np.float32)
        if (lengths == width).any():
            out[lengths == width] = np.stack([r for r, n in zip(embeddings, lengths) if n == width])
        return out
    if embeddings.shape[1] != width:
        code[:] = 1
        return np.zeros((len(embeddings), width), np.float16)
    return embeddings


def _fixed(metadata: pa.Table, name: str, kind: pa.DataType) -> "pa.Array | None":
    """A metadata column that fills a fixed shard column (sha256, width, height) when its type fits."""
    if name not in metadata.column_names:
        return None
    column = metadata.column(name)
    ok = pa.types.is_integer(column.type) if kind == pa.int32() else pa.types.is_string(column.type)
    return column.cast(kind) if ok else None


def _rows_table(metadata: pa.Table, uri_column: str, source: str, vectors: np.ndarray, lanes: bool) -> pa.Table:
    """The shard columns (uri_hash too: hashed here, chunk by chunk, not by the threads that write shards), then
    the other metadata columns as they came."""
    n = metadata.num_rows
    uris = metadata.column(uri_column).cast(pa.string())
    columns: dict[str, Any] = {"uri": uris, "source": pa.repeat(pa.scalar(source, pa.string()), n),
                               "uri_hash": pa.array(uri_hash(uris, lanes), pa.uint64())}
    used = {uri_column}
    for name, kind in (("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32())):
        given = _fixed(metadata, name, kind)
        columns[name] = given if given is not None else pa.nulls(n, kind)
        used.update([name] if given is not None else [])
    columns["embedding"] = embedding_array(vectors)
    for name in metadata.column_names:
        if name not in used:
            columns[meta_name(name)] = metadata.column(name)
    return pa.table(columns)


def _errors_table(chunk: Chunk, uris: pa.Array, source: str, code: np.ndarray) -> "pa.Table | None":
    bad = np.nonzero(code)[0]
    if not len(bad):
        return None
    uri_list = uris.take(pa.array(bad)).to_pylist()
    rows = {"uri": [u if u is not None else f"{source}#{chunk.start + i}" for u, i in zip(uri_list, bad)],
            "source": [source] * len(bad), "stage": ["import"] * len(bad),
            "reason": [REASONS[int(c)] for c in code[bad]],
            "detail": [f"row {chunk.start + int(i)} of {source}" for i in bad]}
    return pa.table(rows, schema=ERROR_SCHEMA)


def map_chunk(chunk: Chunk, unit: Unit, width: int, projection: Projection,
              lanes: bool = True) -> tuple["pa.Table | None", "pa.Table | None"]:
    """Valid rows (L2-normalised, projected, fp16; no ids yet) and error rows of one chunk (`lanes`: how
    uri_hash runs)."""
    uri_column = unit.uri_column
    code = np.zeros(chunk.metadata.num_rows, np.int8)
    x = _matrix(chunk.embeddings, width, code)
    checked, vectors = unit_rows(x)
    code[code == 0] = checked[code == 0]
    uris = chunk.metadata.column(uri_column).combine_chunks()
    if uris.null_count:
        code[(code == 0) & uris.is_null().to_numpy(zero_copy_only=False)] = 4
    errors = _errors_table(chunk, uris, unit.source, code)
    good = code == 0
    if not good.any():
        return None, errors
    everything = bool(good.all())
    if projection.kind != "none":  # from the rows as given: no fp16 rounding before the projection
        vectors = projection.apply(x if everything else x[good]).astype(np.float16)
    elif not everything:
        vectors = vectors[good]
    metadata = chunk.metadata if everything else chunk.metadata.filter(pa.array(good))
    return _rows_table(metadata, uri_column, unit.source, vectors, lanes), errors


# ---- writer and runner
class ImportWriter:
    """Buffers mapped chunks; cuts them into shards of <= shard_size rows (rows with ids + error rows), each
    committed as one manifest version, in stream order.

    A cut shard is staged (Parquet write, checksum, fsync; no GIL held) by a pool of `depth` threads while the
    next ones are read and mapped, and listed by one commit thread in the order they were cut. At most depth + 1
    shards are cut and not yet committed (`cut` waits for the oldest commit), so memory stays bounded by about
    depth + 2 shards. Once a stage or a commit fails, nothing after it is committed: a crash or an error leaves
    a prefix of the stream committed (staged files of a dead run are orphans the store sweeps).
    """

    def __init__(self, writer: StoreWriter, shard_size: int, summary: ImportSummary, depth: int):
        self.writer, self.shard_size, self.summary, self.depth = writer, shard_size, summary, max(1, depth)
        self.rows: list[pa.Table] = []
        self.errors: list[pa.Table] = []
        self.pending = 0
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="pnsfw-import-stage")
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="pnsfw-import-commit")
        self.slots = threading.Semaphore(self.depth + 1)
        self.failed = threading.Event()
        self.commits: deque[Future[None]] = deque()
        base = writer.manifest
        self.next_id, self.numbers = base.next_id, [base.next_part(base.shards), base.next_part(base.errors)]

    def add(self, rows: "pa.Table | None", errors: "pa.Table | None") -> None:
        count = rows.num_rows if rows is not None else 0
        if self.pending and self.pending + count > self.shard_size:
            self.cut()
        if rows is not None:
            self.rows.append(rows)
            self.pending += count
        if errors is not None:
            self.errors.append(errors)
            for reason, n in Counter(errors.column("reason").to_pylist()).items():
                self.summary.failed[reason] = self.summary.failed.get(reason, 0) + n

    def cut(self) -> None:
        """Stage the buffered rows as one shard (ids taken in stream order) and queue its commit."""
        if not self.rows and not self.errors:
            return
        table = None
        if self.rows:
            table = self.rows[0] if len(self.rows) == 1 else pa.concat_tables(self.rows, promote_options="default")
            ids = np.arange(self.next_id, self.next_id + table.num_rows, dtype=np.int64)
            table, self.next_id = table.add_column(0, "id", pa.array(ids)), self.next_id + table.num_rows
        errors = pa.concat_tables(self.errors) if self.errors else None
        numbers = (self.numbers[0], self.numbers[1])
        self.numbers = [numbers[0] + (table is not None), numbers[1] + (errors is not None)]
        count, self.rows, self.errors, self.pending = self.pending, [], [], 0
        self.slots.acquire()  # released by a commit: at most depth + 1 shards wait
        self._reap(wait=False)
        staged = self.pool.submit(self.writer.stage, table, errors, numbers)
        self.commits.append(self.committer.submit(self._commit, staged, count))

    def _commit(self, staged: "Future[StagedCommit]", count: int) -> None:
        """On the commit thread, in cut order; after a failure the later shards are not committed."""
        try:
            if self.failed.is_set():
                raise RuntimeError("not committed: an earlier shard failed")
            self.writer.commit_staged(staged.result())
            self.summary.imported += count
        except BaseException:
            self.failed.set()
            raise
        finally:
            self.slots.release()

    def _reap(self, wait: bool) -> None:
        """Drop finished commits from the front, raising the first failure (with its own type)."""
        while self.commits and (wait or self.commits[0].done()):
            self.commits.popleft().result()

    def finish(self) -> None:
        """Cut the rest, then wait until every shard is committed, in order."""
        self.cut()
        self._reap(wait=True)

    def close(self) -> None:
        """Stop the threads; after an error nothing more is committed."""
        self.failed.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.committer.shutdown(wait=True, cancel_futures=True)


def _first_chunk(units: list[Unit], offsets: Counter[str], options: ImportOptions) -> "tuple[int, np.ndarray] | None":
    """(width, sample for a PCA fit) from the first unit with rows left; None when everything is imported."""
    for unit in units:
        if offsets[unit.source] < unit.rows:
            chunk = next(unit.read(offsets[unit.source], max(options.pca_rows, 1)))
            emb = chunk.embeddings
            if emb.dtype == object:
                lengths = Counter(len(r) for r in emb)
                width = lengths.most_common(1)[0][0]
                return width, np.stack([r for r in emb if len(r) == width]).astype(np.float32)
            return int(emb.shape[1]), np.nan_to_num(np.asarray(emb, np.float32))
    return None


def _stream(units: list[Unit], offsets: Counter[str], options: ImportOptions, projection: Projection,
            out: ImportWriter) -> None:
    """Every unit's rows from its committed offset on, mapped, into the writer."""
    chunk_rows = max(1, min(options.chunk_rows, options.shard_size))
    chunk_rows = -(-options.shard_size // -(-options.shard_size // chunk_rows))  # whole chunks fill a shard
    threads = options.map_threads or max(1, min(6, cpu_count() // 3))
    lanes = options.hash_lanes if options.hash_lanes is not None else threads > 1

    def mapped(item: tuple[Unit, Chunk]) -> tuple[int, "pa.Table | None", "pa.Table | None"]:
        unit, chunk = item
        return int(getattr(chunk.embeddings, "nbytes", 0)), *map_chunk(chunk, unit, projection.width, projection,
                                                                         lanes)

    chunks = background(_chunks(units, offsets, chunk_rows), READ_AHEAD, "pnsfw-import-read")
    with ThreadPoolExecutor(threads, thread_name_prefix="pnsfw-import-map") as pool:
        for nbytes, rows, errors in ordered_map(pool, mapped, chunks, threads + 1):
            out.summary.bytes_read += nbytes
            out.add(rows, errors)


def _chunks(units: list[Unit], offsets: Counter[str], chunk_rows: int) -> Iterator[tuple[Unit, Chunk]]:
    """(unit, chunk) from every unit's committed offset on, in order."""
    for unit in units:
        if offsets[unit.source] < unit.rows:
            for chunk in unit.read(offsets[unit.source], chunk_rows):
                yield unit, chunk


def run_import(paths: list[str], store_root: "str | Path", options: ImportOptions | None = None) -> ImportSummary:
    """Import embeddings from PATHs into the store (resumable, idempotent); returns what it did."""
    options = options or ImportOptions()
    started, summary = time.time(), ImportSummary()
    units = open_units(paths, options.layout, options.embedding_column, options.uri_column)
    summary.units = len(units)
    store = Store(store_root)
    with store.writer() as writer:
        offsets = committed_offsets(store)
        summary.already_present = sum(min(offsets[u.source], u.rows) for u in units)
        first = _first_chunk(units, offsets, options)
        if first is None:
            summary.seconds = time.time() - started
            return summary
        projection = _space(writer, options, first[0], first[1])
        out = ImportWriter(writer, options.shard_size, summary, options.stage_threads or min(4, cpu_count()))
        try:
            _stream(units, offsets, options, projection, out)
            out.finish()
        finally:
            out.close()
    summary.seconds = time.time() - started
    return summary
