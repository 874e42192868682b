"""Review endpoints beside routes.py: item thumbnails, labels saved in the store, and the review queue."""

import threading
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import BadInput, PnsfwError
from ..store import Store
from . import images, thumbs
from .engine import Engine
from .routes import ItemId, json_response  # one item id: int64 (0 .. 2**63 - 1) on every route
from .schemas import IdField

router = APIRouter()
N_MAX = 500


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictInt = IdField
    label: str | None = Field(..., description="One of the label classes (GET /v1/labels lists them: "
                                                "--label-classes, else the model's classes); null takes the "
                                                "item's label back.")
    by: StrictStr | None = Field(None, min_length=1, max_length=64, description="Who gives the label (kept in "
                                                                                  "the audit trail).")


class Review:
    """The app's review state: thumbnail cache, the store's labels log, people's labels on every searcher."""

    def __init__(self, engine: Engine):
        from ..classifier.reviewed import LabelLog

        self.engine, self.thumbs, self.lock = engine, thumbs.ThumbCache(), threading.Lock()
        # its own handle on the store: refreshing it for labels never moves the snapshot the engine serves
        self.log = LabelLog(Store.open(engine.store.root))
        self.classes()  # a bad --label-classes fails at startup, not on every label
        with engine.swap_lock:
            self.show_store_labels(engine.searcher)
            engine.searcher_hooks.append(self.show_store_labels)

    def classes(self) -> tuple[list[str] | None, bool]:
        """(the labels a reviewer may give, whether they are a declared set)."""
        from ..classifier.reviewed import resolve_classes

        clf = self.engine.classifier
        with self.lock:
            return resolve_classes(self.log, self.engine.settings.label_classes,
                                   list(clf.classes) if clf is not None else None)

    def allowed(self) -> list[str] | None:
        return self.classes()[0]

    def current(self) -> dict[int, dict[str, Any]]:
        """id -> a person's latest label row, with what other processes committed since."""
        with self.lock:
            return self.log.current()

    def show_store_labels(self, searcher: Any) -> None:
        """Hits and items show a person's label where there is one, else the model's training label (run on
        every searcher before it serves, and after every save)."""
        training = searcher.cache.setdefault("training_labels", dict(searcher.labels))
        labels = dict(training)
        labels.update({i: row["label"] for i, row in self.current().items()})
        searcher.labels = labels

    def save(self, items: list[tuple[int, str | None]], by: str | None = None) -> dict[str, Any]:
        from ..classifier.reviewed import save_labels

        allowed, declared = self.classes()
        with self.engine.swap_lock:
            with self.lock:
                rows = save_labels(self.log.store, items, "review", allowed, by, declared)
            self.show_store_labels(self.engine.searcher)
        return {"saved": rows, "labels": len(self.current()), "version": self.log.store.version}


def install(app: FastAPI) -> None:
    """Add the review routes and their state to the app."""
    app.state.review = Review(app.state.engine)
    app.include_router(router)


def review_of(request: Request) -> Review:
    return request.app.state.review


def thumbnail(review: Review, item_id: int) -> bytes:
    """The cached thumbnail of a store item, made from its stored image on a miss."""
    uri = review.engine.item(item_id)["uri"]
    key = (item_id, uri)
    data = review.thumbs.get(key)
    if data is None:
        data = thumbs.make_thumb(images.read_store_image(uri)[0])
        review.thumbs.put(key, data)
    return data


@router.get("/v1/items/{item_id}/thumb", tags=["items"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
async def item_thumb(request: Request, item_id: int = ItemId) -> Response:
    """A small JPEG of the stored image (256 px on the long side), cached in memory; what the page shows."""
    data = await run_in_threadpool(thumbnail, review_of(request), item_id)
    return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})


def parse_labels(body: bytes) -> tuple[list[tuple[int, str | None]], str | None]:
    """`{id, label[, by]}` or a list of them -> ([(id, label)], by); 422 for anything else."""
    import json

    try:
        data = json.loads(body or b"null")
        entries = [LabelIn.model_validate(e) for e in (data if isinstance(data, list) else [data])]
    except (ValueError, ValidationError) as exc:
        raise BadInput(f"send JSON {{\"id\": ID, \"label\": LABEL}} or a list of them: {str(exc).splitlines()[0]}") \
            from None
    givers = {e.by for e in entries}
    if len(givers) > 1:
        raise BadInput("one `by` per request: send the labels of each person separately")
    return [(e.id, e.label) for e in entries], givers.pop() if givers else None


@router.post("/v1/labels", tags=["labels"], openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [LabelIn.model_json_schema(),
                                               {"type": "array", "items": LabelIn.model_json_schema()}]}}}}})
async def post_labels(request: Request) -> Response:
    """Save labels in the store (source `review`): 422 for a label not among the label classes, 404 for an
    unknown id. Hits and items show them at once."""
    items, by = parse_labels(await request.body())
    return json_response(await run_in_threadpool(review_of(request).save, items, by))


By = Query(None, min_length=1, max_length=64, description="Who takes it back (kept in the audit trail).")


@router.delete("/v1/labels/{item_id}", tags=["labels"])
async def delete_label(request: Request, item_id: int = ItemId, by: str | None = By) -> Response:
    """Take a person's label of an item back (the review page's undo); the log keeps both rows."""
    return json_response(await run_in_threadpool(review_of(request).save, [(item_id, None)], by))


@router.get("/v1/labels/classes", tags=["labels"])
async def label_classes(request: Request) -> Response:
    """The labels a reviewer may give (--label-classes, the set recorded in the store, else the model's)."""
    review = review_of(request)
    classes, declared = await run_in_threadpool(review.classes)
    clf = review.engine.classifier
    return json_response({"classes": classes, "declared": declared,
                          "model_classes": list(clf.classes) if clf is not None else None})


@router.get("/v1/labels", tags=["labels"])
async def get_labels(request: Request,
                     source: str | None = Query(None, description="Only this source (review, cli, file)."),
                     history: bool = Query(False, description="Every row of the log (the audit trail: who, "
                                                              "when, take-backs), not only each item's latest."),
                     last: int | None = Query(None, ge=1, le=100_000, description="Only the last N rows (the "
                                                                                    "newest, with history)."),
                     format: Literal["json", "csv"] = Query("json", description="csv: a file that `pnsfw "
                                                                                 "label --file` imports.")
                     ) -> Response:
    """People's labels: each item's latest (or, with history, every row), with uri, source, time and giver."""
    review = review_of(request)
    rows = await run_in_threadpool(label_rows, review, history, source, last)
    if format == "csv":
        return Response(labels_csv(rows), media_type="text/csv",
                        headers={"content-disposition": "attachment; filename=labels.csv"})
    classes, declared = await run_in_threadpool(review.classes)
    return json_response({"count": len(rows), "classes": classes, "declared": declared, "labels": rows})


def label_rows(review: Review, history: bool, source: str | None = None, last: int | None = None
               ) -> list[dict[str, Any]]:
    """Label rows as dicts with each item's uri: the latest per item (by id), or the whole log oldest first."""
    from ..classifier.reviewed import ROW_FIELDS

    current = review.current()
    if history:
        with review.lock:
            table = review.log.history()
        rows = [dict(zip(("id", *ROW_FIELDS), values))
                for values in zip(*(table.column(c).to_pylist() for c in ("id", *ROW_FIELDS)))]
    else:
        rows = [dict(row, id=i) for i, row in sorted(current.items())]
    rows = [r for r in rows if source is None or r["source"] == source]
    rows = rows[-last:] if last else rows
    searcher = review.engine.searcher
    ids = np.array([r["id"] for r in rows], np.int64)
    known = searcher.rows_of(ids) >= 0  # a label may name an id this store version lacks
    found = iter(searcher.store.uris_of(ids[known]) if known.any() else [])
    return [dict(r, uri=next(found) if ok else None) for r, ok in zip(rows, known.tolist())]


CSV_COLUMNS = ("id", "uri", "label", "source", "at", "by", "classes")


def labels_csv(rows: list[dict[str, Any]]) -> bytes:
    """The rows as CSV (at as ISO 8601 UTC)."""
    import csv
    import io
    from datetime import datetime, timezone

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        at = datetime.fromtimestamp(r["at"], timezone.utc).isoformat() if r["at"] is not None else ""
        writer.writerow([r["id"], r["uri"] or "", r["label"] or "", r["source"], at, r["by"] or "", r["classes"] or ""])
    return out.getvalue().encode()


@router.get("/v1/review", tags=["labels"])
async def review_queue(request: Request, n: int = Query(50, ge=1, le=N_MAX),
                       model: str | None = Query(None, description="Review this model's verdicts "
                                                                   "(default: the served one).")) -> Response:
    """Unlabelled items ranked for review: near the threshold, disagreeing with their labelled neighbours, or
    where the store's models disagree; each with its verdict, agreement, reasons, thumbnail URL and metadata."""
    review = review_of(request)
    engine = review.engine
    engine.require_classifier()
    labelled = set(await run_in_threadpool(review.current))
    clf, others = await run_in_threadpool(_models, engine, model)
    from .queue import build_queue

    queue = await engine.vectors.call(build_queue, engine.searcher, clf, others, labelled, n)
    classes, declared = await run_in_threadpool(review.classes)
    queue.update(model_classes=queue["classes"], classes=classes or queue["classes"], declared=declared)
    return json_response(images.jsonable(queue))


def _models(engine: Engine, model: str | None) -> tuple[Any, Any]:
    """The classifier to review (NAME or the served one) and the store's other models of the same space."""
    from ..classifier.model import list_models
    from ..classifier.scorer import StoreScorer
    from .queue import Others

    clf = engine.classifier if model in (None, engine.model_name) else StoreScorer.open(engine.store, model)
    engine.store.check_space(clf.classifier.space, f"model {clf.name}")
    others = {}
    for name in list_models(engine.store):
        if name != clf.name:
            other = StoreScorer.open(engine.store, name)
            if other.classifier.space == engine.store.space:
                others[name] = other
    return clf, Others(others)


HEADLINE = ("count", "positives", "pr_auc", "roc_auc", "precision_at_recall_0.9", "threshold", "accuracy",
            "precision", "recall", "f1", "fpr")


def model_summaries(engine: Engine) -> dict[str, Any]:
    """Each model of the store (re-read: a retrain shows without a restart) with its headline metrics and, after a
    retrain, the delta table against the model it replaced and how many verdicts changed."""
    from ..classifier.model import list_models, load_classifier

    engine.store.refresh()
    models: list[dict[str, Any]] = []
    for name in list_models(engine.store):
        try:
            meta = load_classifier(engine.store, name, check_space=False).meta
        except (PnsfwError, OSError, ValueError, KeyError) as exc:  # one unreadable model must not hide the others
            models.append({"name": name, "error": str(exc).splitlines()[0]})
            continue
        split = meta.get("evaluated_on") or next(iter(meta.get("metrics") or {}), None)
        metrics = (meta.get("metrics") or {}).get(split) or {}
        models.append({"name": name, "created": meta.get("created"), "classes": meta.get("classes"),
                       "nsfw_classes": meta.get("nsfw_classes"), "threshold": meta.get("threshold"),
                       "evaluated_on": split, "metrics": {k: metrics.get(k) for k in HEADLINE},
                       "labels": (meta.get("data") or {}).get("labels"), "retrain": _slim(meta.get("retrain"))})
    return {"served": engine.model_name, "models": models}


def _slim(retrain: dict[str, Any] | None) -> dict[str, Any] | None:
    """retrain without the bulky threshold tables."""
    if not retrain:
        return None
    previous = dict(retrain["previous"], metrics_saved=None,
                    on_this_split={k: (retrain["previous"].get("on_this_split") or {}).get(k) for k in HEADLINE})
    return dict(retrain, previous=previous)


@router.get("/v1/models", tags=["service"])
async def models(request: Request) -> Response:
    """The store's classifiers: headline metrics, and after a retrain the delta against the replaced model."""
    return json_response(images.jsonable(await run_in_threadpool(model_summaries, review_of(request).engine)))
