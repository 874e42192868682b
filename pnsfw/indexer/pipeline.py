"""The runner: sources -> reader/decoder workers -> CLIP encoder -> projection -> shards -> commit."""

import dataclasses
import functools
import itertools
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..concurrency import ProcessPool, cpu_count, one_blas_thread, quiet_collector
from ..errors import BadInput, Interrupted, SourceError
from ..progress import progress_bar
from ..store import Projection, Store, StoreWriter
from ..store.shards import uri_hash_one
from .decode import DEFAULT_MAX_PIXELS
from .encoder import DEFAULT_MODEL, Encoder, describe_encoder, load_encoder, resolve_device
from .gpu.options import GpuOptions
from .ingest import IngestOptions
from .projection import check_projection_option, make_projection, needs_sample
from .reader import DEFAULT_MAX_DOWNLOAD, Result, decoded_stream, process_chunk
from .sources import Item, check_sources, iter_items
from .timeline import mark
from .writer import ShardWriter, WriterThread

log = logging.getLogger(__name__)


@dataclass
class IndexOptions(IngestOptions):
    """Options of `pnsfw index` (see its --help); a new store's defaults: DEFAULT_MODEL, a `random` projection."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 0  # 0: 64 on CPU, 1024 on CUDA
    workers: int = 0  # 0: one per core; -1: decode in this process
    commit_interval: float = 60.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = 10.0  # per URL, in total
    max_download: int = DEFAULT_MAX_DOWNLOAD
    progress: bool = False
    reader: str = "auto"  # a key of READERS; auto: tensor on CUDA, pil on CPU
    retry_errors: bool = False  # try the uris of error rows again
    gpu: GpuOptions = field(default_factory=GpuOptions)  # the tensor reader's (--gpu-*)


@dataclass
class IndexSummary:
    indexed: int = 0
    already_present: int = 0
    committed: int = 0  # rows committed so far (what an interrupted run keeps)
    committed_errors: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    steady_seconds: float = 0.0  # from the first batch encoded to the last commit
    steady_images: int = 0
    late_seconds: float = 0.0  # the same from the first batch at or past half the run's images (a pipeline
    late_images: int = 0  # that keeps several batches in flight is full by then)
    index: dict[str, Any] | None = None

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_s(self) -> float:
        return self.steady_images / self.steady_seconds if self.steady_seconds else 0.0

    @property
    def late_images_per_s(self) -> float:
        return self.late_images / self.late_seconds if self.late_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), images_per_s=self.images_per_s, steady_images_per_s=self.steady_images_per_s,
                    late_images_per_s=self.late_images_per_s)


class NewItems:
    """The items of SOURCEs not yet in the store (nor repeated), as a stream; counts the ones already present.

    `on_first` runs when the first new item is found (the runner starts loading the model then)."""

    def __init__(self, entries: Iterator[Item], known: Callable[[str], bool],
                 on_first: Callable[[], None] | None):
        self.entries, self.known, self.on_first = entries, known, on_first
        self.present = 0

    def __iter__(self) -> Iterator[Item]:
        seen: set[int] = set()  # this run's items only (64-bit keys), never the store's
        for item in self.entries:
            key = uri_hash_one(item.uri)
            if key in seen:
                continue
            seen.add(key)
            if self.known(item.uri):
                self.present += 1
                continue
            if self.on_first is not None:
                self.on_first()
                self.on_first = None
            yield item


def _entries(sources: list[str], column: str | None) -> Iterator[Item]:
    for source in sources:
        yield from iter_items(source, column)


def _listing(sources: list[str], column: str | None) -> Iterator[Item]:
    """Every entry of SOURCEs (checked by check_sources); SourceError before any work when they hold nothing."""
    entries = _entries(sources, column)
    first = next(entries, None)
    if first is None:
        raise SourceError(f"no images in {', '.join(sources)}: nothing to index")
    return itertools.chain([first], entries)


def _known(store: Store, retry_errors: bool) -> Callable[[str], bool]:
    """Whether a uri is already committed (as a row, or as an error row unless they are retried)."""
    if not store.exists:
        return lambda uri: False
    return store.known_uris(errors=not retry_errors).__contains__


def store_model(store: Store, model: str | None) -> str:
    """--model, else the encoder the store was built with, else DEFAULT_MODEL."""
    if model:
        return model
    encoder = store.encoder if store.exists else None
    return str(encoder["name"]) if encoder else DEFAULT_MODEL


def _projection_for(writer: StoreWriter, options: IndexOptions, encoder: Encoder) -> Projection | None:
    """The store's projection, or a new one (None while a PCA waits for its sample)."""
    if writer.store.projection_info:
        return writer.store.projection()
    if needs_sample(options.projection or "random"):
        return None
    return make_projection(options.projection or "random", encoder.width, seed=options.seed)


def _batches(stream: Iterator[Result], size: int, on_error: Callable[[Result], None]) -> Iterator[list[Result]]:
    batch: list[Result] = []
    for result in stream:
        if result.pixels is None:
            on_error(result)
            continue
        batch.append(result)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _default_batch(options: IndexOptions, encoder: Encoder) -> int:
    return options.batch_size or (1024 if encoder.device.startswith("cuda") else 64)


def _make_pool(workers: int) -> ProcessPool | None:
    """Fork the decode workers before torch starts threads; -1 decodes inline."""
    if workers < 0:
        return None
    return ProcessPool(workers or cpu_count(), name="pnsfw-decode")


def _pil_stage(items: Iterable[Item], options: IndexOptions, encoder: Encoder, pool: Any,
               on_error: Callable[[Result], None], batch: int) -> Iterator[tuple[list[Result], np.ndarray]]:
    """CPU reader: PIL decode + resize in the worker processes, then encode (rows, features) per batch."""
    work = functools.partial(process_chunk, size=encoder.resolution, max_pixels=options.max_pixels,
                             timeout=options.timeout, max_download=options.max_download)
    stream = decoded_stream(items, work, pool, chunk=16, depth=4 * getattr(pool, "workers", 1))
    for rows in _batches(stream, batch, on_error):
        yield rows, encoder.encode_pixels(np.stack([r.pixels for r in rows]))  # type: ignore[misc]


def _tensor_stage(*args: Any) -> Iterator[tuple[list[Result], np.ndarray]]:
    from .gpu import tensor_stage  # decode/resize/encode on the device (nvJPEG on CUDA)

    return tensor_stage(*args)


# a reader/encoder stage: (items, options, encoder, pool, on_error, batch) -> (rows, raw features) per batch
Stage = Callable[..., Iterator[tuple[list[Result], np.ndarray]]]
READERS: dict[str, Stage] = {
    "pil": _pil_stage, "tensor": _tensor_stage}


def _tensor_warm_up(device: str) -> None:
    from .gpu import warm_up

    warm_up(device)


WARM_UPS: dict[str, Callable[[str], None]] = {"tensor": _tensor_warm_up}


def reader_name(options: IndexOptions, device: str) -> str:
    """options.reader, or by device."""
    name = options.reader
    if name == "auto":
        name = "tensor" if device.startswith("cuda") else "pil"
    if name not in READERS:
        raise BadInput(f"unknown reader {name!r} ({', '.join(READERS)})")
    return name


def reader_stage(options: IndexOptions, encoder: Encoder) -> Callable[..., Iterator[tuple[list[Result], np.ndarray]]]:
    """The reader/encoder stage of the run."""
    return READERS[reader_name(options, encoder.device)]


def _encode_all(writer: WriterThread, batches: Iterator[tuple[list[Result], np.ndarray]], encoder: Encoder,
                summary: IndexSummary, bar: Any) -> None:
    done: list[tuple[float, int]] = []  # (when, images so far) per batch
    for batch, features in batches:
        writer.add(batch, features)
        summary.indexed += len(batch)
        bar.update(len(batch))
        if not done:
            mark("first batch encoded")
        done.append((time.perf_counter(), summary.indexed))
    mark("last batch encoded")
    writer.commit()
    mark("last commit")
    _steady_rates(summary, done, time.perf_counter())


def _steady_rates(summary: IndexSummary, done: list[tuple[float, int]], end: float) -> None:
    """The summary's steady and late windows from each batch's (when, images so far)."""
    if not done:
        return
    summary.steady_seconds, summary.steady_images = end - done[0][0], summary.indexed - done[0][1]
    when, count = next((w, c) for w, c in done if c >= summary.indexed / 2)
    summary.late_seconds, summary.late_images = end - when, summary.indexed - count


def _index_items(writer: StoreWriter, items: Iterable[Item], options: IndexOptions, encoder: Encoder,
                 pool: Any, summary: IndexSummary, stage: Stage | None = None) -> None:
    projection = _projection_for(writer, options, encoder)
    if projection is not None:
        writer.set_space(encoder.describe(), projection)

    def fit(sample: np.ndarray) -> Projection:
        fitted = make_projection(options.projection or "random", encoder.width, sample, options.seed)
        writer.set_space(encoder.describe(), fitted)
        return fitted

    def committed(rows: int, errors: int) -> None:
        summary.committed += rows
        summary.committed_errors += errors

    shards = WriterThread(ShardWriter(writer, options.shard_size, options.commit_interval, projection, fit,
                                      options.pca_rows, committed))
    failures: Counter = Counter()

    def on_error(result: Result) -> None:
        failures[result.reason] += 1
        shards.add_error(result)
        bar.update(1)

    stage = stage or reader_stage(options, encoder)
    try:
        with progress_bar(options.progress, None, "img") as bar, quiet_collector():
            batches = stage(items, options, encoder, pool, on_error, _default_batch(options, encoder))
            _encode_all(shards, batches, encoder, summary, bar)
    finally:
        shards.close(discard=True)  # a stopped run: after the commit in progress, as the rows it lists
        log.debug("writer thread busy %.2f s", shards.busy_s)
        summary.failed = dict(failures.most_common())


CONTEXT_WAIT_S = 30.0  # the longest close() waits for the CUDA start-up thread (it takes ~1-3 s when well)


class _Startup:
    """Forks the decode workers, then loads the encoder on a thread while the sources are still being listed:
    listing a large collection and loading CLIP (imports, checkpoint, CUDA) each take seconds."""

    def __init__(self, options: IndexOptions, encoder: Encoder | None,
                 load: Callable[[str, str, str], Encoder] = load_encoder):
        self.options, self.encoder, self.load = options, encoder, load
        self.pool: Any = None
        self._threads: list[threading.Thread] = []
        self._loader: threading.Thread | None = None
        self._error: BaseException | None = None
        self._forked = False
        self._context: threading.Thread | None = None

    def prepare(self) -> None:
        """Before the listing of a new store (every item it finds is new): the workers forked and torch imported
        beside the listing. Nothing is read or downloaded yet: the SOURCEs may hold no image (so device workers,
        which load the model as they start, wait for start)."""
        from .gpu import wants_device_workers

        if wants_device_workers(self.options):
            return
        self._fork()
        if self.encoder is None and self.load is load_encoder:
            self._spawn(_import_torch, "pnsfw-import-torch")

    def start(self) -> None:
        """At the first new item: the encoder's load and the reader's warm-up, on threads."""
        self._fork()
        if self.encoder is None and self._loader is None:
            self._loader = self._spawn(self._load, "pnsfw-load-encoder")
            self._spawn(self._warm_up, "pnsfw-warm-up")

    def _fork(self) -> None:
        from .gpu import (
            DeviceWorkers,
            first_unit_size,
            premade_decoders,
            start_context,
            start_device_workers,
            warm_ahead,
        )

        if self._forked:
            return
        self._forked = True
        # before any thread: forking a threaded process is unsafe (several GPUs: their workers load beside this
        # process, which then uses none)
        self.pool = start_device_workers(self.options) or _make_pool(self.options.workers)
        mark("workers forked")
        if not isinstance(self.pool, DeviceWorkers) and self.options.reader != "pil" and self.encoder is None:
            # beside the torch import of the load below: the context, then the decode threads' nvJPEG handles;
            # once torch is in, the tower's kernels beside the checkpoint's load
            decoders = premade_decoders(self.options.gpu, first_unit_size(self.options))
            self._context = start_context(self.options.device, decoders, warm_ahead(self.options))

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _load(self) -> None:
        try:
            assert self.options.model is not None  # resolved (given or the store's) before the run starts
            self.encoder = self.load(self.options.model, self.options.device, self.options.precision)
        except BaseException as exc:  # re-raised by the caller's thread in get()
            self._error = exc

    def _warm_up(self) -> None:
        """The reader's own start-up (nvJPEG on CUDA) beside the model load; failures show up in the run."""
        try:
            device = resolve_device(self.options.device)
            WARM_UPS.get(reader_name(self.options, device), lambda _: None)(device)
        except Exception as exc:
            log.debug("reader warm-up failed (the run reports it if it matters): %s", exc)

    def get(self) -> Encoder:
        if self._loader is not None:  # the reader's warm-up (nvJPEG, torchvision's decoder) goes on beside the run
            self._loader.join()
        if self._error is not None:
            raise self._error
        assert self.encoder is not None
        mark("encoder loaded")
        from .gpu import DeviceWorkers

        if isinstance(self.pool, DeviceWorkers) and reader_name(self.options, self.encoder.device) != "tensor":
            log.warning("device workers were started, but torch sees no CUDA GPU: decoding on the CPU instead")
            self.pool.terminate()
            self.pool = _make_pool(self.options.workers)
        return self.encoder

    def close(self, interrupted: bool = False) -> None:
        if self.pool is not None:
            self.pool.terminate()
        for thread in () if interrupted else self._threads:
            thread.join()  # a failed run still waits for the load, so nothing dies mid-import; Ctrl-C does not
        if self._context is not None and not interrupted:
            self._close_context()

    def _close_context(self) -> None:
        """Destroy the nvJPEG handles made ahead that no decoder took, once the context's thread is done; a
        thread still inside a driver or nvJPEG call after CONTEXT_WAIT_S keeps them (the process's exit frees
        them): the run's rows are committed by now and must not wait on it."""
        from .gpu import discard_premade

        assert self._context is not None
        self._context.join(timeout=CONTEXT_WAIT_S)
        if self._context.is_alive():
            log.warning("the CUDA start-up thread did not finish in %.0f s (inside a driver call); "
                        "its nvJPEG handles are left to the process's exit", CONTEXT_WAIT_S)
            return
        discard_premade()


def _import_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # the load reports it
        log.debug("torch did not import ahead of the load: %s", exc)


def _stopped(summary: IndexSummary, store: Store, signum: int) -> Interrupted:
    """The one line an interrupted run ends with."""
    store.refresh()
    where = f"{store.rows:,} rows in {store.root}" if store.exists else f"nothing in {store.root}"
    return Interrupted(signum, f"stopped after committing {summary.committed:,} new rows and "
                               f"{summary.committed_errors:,} error rows ({where}); rerun the same command to go on")


def run_index(sources: list[str], store_root: str, options: IndexOptions | None = None,
              encoder: Encoder | None = None,
              finish: Callable[[Store], dict[str, Any]] | None = None, stage: Stage | None = None) -> IndexSummary:
    """Index SOURCEs into the store; resumable, incremental, one writer at a time.

    `finish` runs under the write lock after the last commit (the CLI passes the FAISS update); `stage`
    replaces the reader/encoder stage (the Ray runner injects its own).
    SIGINT (KeyboardInterrupt) and SIGTERM (Interrupted, raised by the CLI's handler) stop it within a
    moment: committed rows are kept and `Interrupted` says how far it got.
    """
    options = options or IndexOptions()
    started = time.perf_counter()
    summary = IndexSummary()
    store = Store(store_root)
    check_sources(sources, options.uri_column)
    options = dataclasses.replace(options, model=store_model(store, options.model))
    # a stage whose workers encode (Ray) needs only the encoder's description on this process
    startup = _Startup(options, encoder, load_encoder if getattr(stage, "needs_weights", True) else describe_encoder)
    stopped = False
    try:
        if not store.exists:
            startup.prepare()
        entries = _listing(sources, options.uri_column)  # before the store is created: no images, no store
        with store.writer() as writer:
            with one_blas_thread():  # the FAISS update after it keeps every thread
                _run(writer, store, entries, options, startup, summary, stage)
            summary.seconds = time.perf_counter() - started
            if finish is not None and store.rows:
                summary.index = finish(store)
    except KeyboardInterrupt:
        stopped = True
        raise _stopped(summary, store, signal.SIGINT) from None
    except Interrupted as exc:
        stopped = True
        raise _stopped(summary, store, exc.signum) from None
    finally:
        startup.close(stopped)
    return summary


def _run(writer: StoreWriter, store: Store, entries: Iterator[Item], options: IndexOptions, startup: "_Startup",
         summary: IndexSummary, stage: Stage | None) -> None:
    check_projection_option(writer, options.projection)
    mark("store locked")
    items = NewItems(entries, _known(store, options.retry_errors), startup.start)
    stream = iter(items)
    first = next(stream, None)
    if first is not None:
        _index_items(writer, itertools.chain([first], stream), options, startup.get(), startup.pool, summary,
                     stage)
    summary.already_present = items.present
