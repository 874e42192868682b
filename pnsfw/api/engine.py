"""What the API serves, model side: the store's searcher, classifier and CLIP encoder behind two micro-batchers.

`encode` batches uploads and texts into one CLIP forward pass (decode included,
in its worker thread); `vectors` batches index searches and classifier scoring.
Everything here that touches a model runs on a batcher thread, never on the
event loop.
"""

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..concurrency import refreeze
from ..errors import BadInput, ModelNotFound, NotAnImage, TooLarge
from ..store import Store
from .batching import MicroBatcher
from .metrics import Metrics

SCORE_ALL_MAX = 20_000_000  # stores up to this size get every missing p_nsfw computed at startup
FOLLOW_S = 1.0  # how often a running server checks the store for new commits
log = logging.getLogger("pnsfw.api")


@dataclass
class Settings:
    """Server options (`pnsfw serve --help`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0
    token: str | None = field(default_factory=lambda: os.environ.get("PNSFW_API_TOKEN") or None)
    clip_model: str | None = None  # None: the model the store's manifest records
    device: str = "auto"
    search: str = "auto"  # exact: torch on `device`; index: the FAISS index; auto: exact on CUDA, else index
    batch_window_ms: float = 2.0
    max_batch: int = 256
    fast_path: bool = True  # answer plain JSON-embedding search/score requests without FastAPI (fastpath.py)
    preload: bool = True  # load the CLIP encoder at startup rather than on the first upload
    label_classes: list[str] | None = None  # what reviewers may answer (None: the store's recorded set, the model's)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def public(self) -> dict[str, Any]:
        return {"max_upload_mb": self.max_upload_mb, "batch_window_ms": self.batch_window_ms,
                "max_batch": self.max_batch, "token_required": bool(self.token), "device": self.device,
                "search": self.search}


def one_blas_thread() -> None:
    """numpy's BLAS to one thread: the server's GEMMs are micro-batches (<= 256 x 256), for which BLAS threads
    only spin; torch and FAISS keep their own thread pools."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional here: without it BLAS keeps its default threads
        return
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and "numpy" in lib.filepath:
            lib.set_num_threads(1)


def resolve_model(store: Store, model: str | None) -> str | None:
    """The classifier to serve: the one named, else `default`, else the only one in the store, else none."""
    from ..classifier.model import DEFAULT_NAME, list_models

    if model:
        return model
    names = list_models(store)
    if DEFAULT_NAME in names:
        return DEFAULT_NAME
    return names[0] if len(names) == 1 else None


def decode_error(message: str) -> Exception:
    """embed_images' per-image error ("reason: detail") -> 413 for decompression bombs, else 415."""
    if message.startswith("decompression_bomb"):
        return TooLarge(f"image too large to decode: {message}")
    return NotAnImage(f"not a usable image: {message}")


def open_scorer(store: Store, model: str | None) -> Any:
    """The classifier NAME as search's Scorer (None without a model)."""
    from ..classifier.scorer import StoreScorer

    return None if model is None else StoreScorer.open(store, model)


def open_searcher(store: Store, scorer: Any, settings: Settings) -> Any:
    """The searcher of `settings.search`; `auto` tries exact torch search on CUDA and falls back to the index."""
    from ..search.exact import resolve_device
    from ..search.query import Searcher

    if settings.search not in ("auto", "exact", "index"):
        raise BadInput(f"search must be auto, exact or index, got {settings.search!r}")
    device = resolve_device(settings.device) if settings.search != "index" else "cpu"
    if settings.search == "exact" or (settings.search == "auto" and device == "cuda"):
        try:
            return Searcher.open(store, scorer, exact_device=device)
        except RuntimeError as exc:  # e.g. CUDA out of memory: the FAISS index still answers
            if settings.search == "exact":
                raise
            searcher = Searcher.open(store, scorer)
            searcher.backend["fallback"] = f"exact search on {device} failed: {str(exc).splitlines()[0]}"
            return searcher
    return Searcher.open(store, scorer)


def only_labels_changed(served: Any, newest: Any) -> bool:
    """True when two manifests differ in their labels parts only (nothing a searcher holds changed)."""
    a, b = served.to_json(), newest.to_json()
    a.pop("labels", None), b.pop("labels", None)
    return a == b


@dataclass
class VectorResult:
    verdict: dict[str, Any] | None
    hits: list[Any]


class Engine:
    """Searcher + classifier + encoder, loaded once, used through micro-batches."""

    def __init__(self, store: Store, model: str | None, settings: Settings):
        self.store, self.settings, self.metrics = store, settings, Metrics()
        self._asked_model = model
        self.model_name = resolve_model(store, model)
        self.classifier = open_scorer(store, self.model_name)
        self.searcher = open_searcher(store, self.classifier, settings)
        self._seen = self._commit_key(store)
        # run on every searcher before it serves (the review state puts people's labels on it); swap_lock keeps a
        # label saved meanwhile from being lost between a new searcher's hooks and its swap
        self.searcher_hooks: list[Callable[[Any], None]] = []
        self.swap_lock = threading.Lock()
        self._stopping = threading.Event()
        self._follower: threading.Thread | None = None
        one_blas_thread()
        self._encoder: Any = None
        self._encoder_lock = threading.Lock()
        self._preload: asyncio.Future[Any] | None = None
        window, size = settings.batch_window_ms / 1000.0, settings.max_batch
        self.encode = MicroBatcher("encode", self._encode_batch, self.metrics, window, size)
        self.vectors = MicroBatcher("vectors", self._vector_batch, self.metrics, window, size)
        self.metrics.set_gauge("pnsfw_store_vectors", "Vectors in the served store.", store.rows)

    async def start(self) -> None:
        self.encode.start()
        self.vectors.start()
        self._follower = threading.Thread(target=self._follow, name="pnsfw-follow-store", daemon=True)
        self._follower.start()
        # the per-row scores load beside the warm-up and the first requests, which score from their vectors
        self.searcher.load_scores_in_background(fill=self.searcher.rows <= SCORE_ALL_MAX)
        await self.vectors.call(self._warm_up)
        if self.settings.preload:  # in the background: ids, vectors and stats answer while torch and CLIP load
            self._preload = asyncio.ensure_future(self.encode.call(self.encoder))
            self._preload.add_done_callback(self._preloaded)

    def _preloaded(self, done: "asyncio.Future[Any]") -> None:
        """Say once when the background load of the encoder failed (uploads and text queries then fail with
        the same message, and load it again)."""
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            log.info("CLIP encoder loaded")
        elif (self.store.encoder or {}).get("declared"):
            # imported embeddings name a CLIP model that may not be loadable here: serve vectors and ids
            log.warning("no CLIP encoder for uploads and text queries: %s", exc)
        else:
            log.error("cannot load the CLIP encoder; uploads and text queries fail: %s", exc)

    def _warm_up(self) -> None:
        """One search and one score before serving (CUDA/cuBLAS initialise on first use, not on a request)."""
        vector = np.zeros(self.store.dim, np.float32)
        vector[0] = 1.0
        self._vector_batch([(vector, min(10, self.store.rows), True)])

    def _commit_key(self, store: Store) -> tuple[int, int]:
        """Changes with every commit that matters to the server: the manifest and the served model's scores."""
        scores = store.scores(self.model_name).version() if self.model_name else 0
        return store.latest_version(), scores

    def _follow(self) -> None:
        """Serve new commits (rows, index, model, scores, labels) without a restart; a state that cannot be
        opened keeps the last one serving."""
        while not self._stopping.wait(FOLLOW_S):
            try:
                key = self._commit_key(self.store)
                if key != self._seen:
                    self.reload(scores_changed=key[1] != self._seen[1])
                    self._seen = key
            except Exception as exc:
                log.warning("store %s changed but cannot be reloaded yet: %s", self.store.root, exc)

    def reload(self, scores_changed: bool = True) -> None:
        """Open the store's newest state and serve it: a commit of labels only is put on the searcher serving;
        anything else builds a fresh searcher beside it, then swaps it in (requests in flight finish on the old)."""
        store = Store.open(self.store.root)
        if not scores_changed and only_labels_changed(self.searcher.store.manifest, store.manifest):
            with self.swap_lock:
                self.store = store
                self._run_hooks(self.searcher)
            return
        name = resolve_model(store, self._asked_model)
        classifier = open_scorer(store, name)
        searcher = open_searcher(store, classifier, self.settings)
        if store.rows <= SCORE_ALL_MAX:  # hits then read p_nsfw from memory, with no forward pass per batch
            searcher.fill_scores()
        else:
            searcher.stored_scores()
        with self.swap_lock:
            self._run_hooks(searcher)
            self.store, self.model_name, self.classifier, self.searcher = store, name, classifier, searcher
        refreeze(collect=True)  # the searcher and model replaced are freed (one full collection a reload)
        self.metrics.set_gauge("pnsfw_store_vectors", "Vectors in the served store.", store.rows)
        log.info("serving store %s version %d: %d vectors", store.root, store.version, store.rows)

    def _run_hooks(self, searcher: Any) -> None:
        for hook in self.searcher_hooks:
            hook(searcher)

    async def stop(self) -> None:
        self._stopping.set()
        if self._preload is not None and not self._preload.done():
            await asyncio.wait([self._preload])
        await self.encode.stop()
        await self.vectors.stop()

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    def encoder(self) -> Any:
        """The embedding service of the store's space, loaded on first use (on a batcher thread)."""
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self._load_encoder()
                refreeze()  # serving (app.py): torch's and CLIP's objects join the frozen ones
        return self._encoder

    def _load_encoder(self) -> Any:
        from ..indexer.embedding import EmbeddingService

        return EmbeddingService.open(self.store, self.settings.clip_model, self.settings.device)

    def _encode_batch(self, items: list[tuple[str, Any]]) -> list[Any]:
        """[("image", bytes) | ("text", str)] -> one unit vector (or an exception) per item, one pass per kind."""
        encoder = self.encoder()
        results: list[Any] = [None] * len(items)
        images = [i for i, (kind, _) in enumerate(items) if kind == "image"]
        if images:
            vectors, errors = encoder.embed_images([items[i][1] for i in images])
            for i, vector, error in zip(images, vectors, errors):
                results[i] = vector if error is None else decode_error(error)
        texts = [i for i, (kind, _) in enumerate(items) if kind == "text"]
        if texts:
            for i, vector in zip(texts, encoder.embed_texts([items[i][1] for i in texts])):
                results[i] = vector
        return results

    def _vector_batch(self, items: list[tuple[np.ndarray, int, bool]]) -> list[VectorResult]:
        """[(vector, k, want_verdict)] -> scores for all, neighbours (k > 0, as hit dicts) in one search."""
        matrix = np.stack([v for v, _, _ in items]).astype(np.float32, copy=False)
        verdicts = self._verdicts(matrix) if self.classifier is not None else [None] * len(items)
        searching = [i for i, (_, k, _) in enumerate(items) if k > 0]
        hits: dict[int, list[Any]] = {}
        if searching:
            k_max = max(items[i][1] for i in searching)
            sims, ids = self.searcher.search_arrays(matrix[searching], k_max)
            rows = self.searcher.hit_rows(ids, sims)
            hits = {i: row[: items[i][1]] for i, row in zip(searching, rows)}
        return [VectorResult(verdicts[i] if want else None, hits.get(i, []))
                for i, (_, _, want) in enumerate(items)]

    def _verdicts(self, matrix: np.ndarray) -> list[dict[str, Any]]:
        return self.classifier.verdicts(matrix)

    def check_vector(self, values: list[float]) -> np.ndarray:
        """A JSON embedding -> unit vector; BadInput (422) for a wrong length, NaN/inf or all zeros."""
        from ..search.query import unit_vectors

        return unit_vectors(values, self.store.dim)[0]

    def require_classifier(self) -> Any:
        if self.classifier is None:
            raise ModelNotFound(f"no classifier to serve: train one (`pnsfw train --store {self.store.root}`) "
                                f"or pass --model NAME")
        return self.classifier

    def explain(self, vector: np.ndarray, k: int, exclude_id: int | None = None) -> dict[str, Any]:
        from ..search.explain import explain_vector

        return explain_vector(self.searcher, vector, k, exclude_id=exclude_id)

    def stats(self) -> dict[str, Any]:
        from ..search.index import read_meta

        classifier = self.classifier
        index = {key: v for key, v in (read_meta(self.store) or {}).items() if key != "shards"}
        model = None if classifier is None else {
            "name": classifier.name, "classes": classifier.classes, "nsfw_classes": classifier.nsfw_classes,
            "threshold": classifier.threshold, "metrics": classifier.meta.get("metrics")}
        return {"store": str(self.store.root), "version": self.store.version, "vectors": self.store.rows,
                "dim": self.store.dim, "space": self.store.space, "encoder": self.store.encoder,
                "projection": self.store.projection_info, "index": index or None, "search": self.searcher.backend,
                "model": model,
                "errors": sum(e.rows for e in self.store.manifest.errors),
                "settings": self.settings.public()}

    def item(self, item_id: int) -> dict[str, Any]:
        """An item's metadata with its label (a person's, else the training one), with or without a model."""
        searcher = self.searcher
        item = dict(searcher.item(item_id))
        item.setdefault("label", searcher.labels.get(int(item_id)))
        return item

    def vector_of(self, item_id: int) -> np.ndarray:
        return np.asarray(self.searcher.vector_of(item_id), dtype=np.float32).reshape(-1)
