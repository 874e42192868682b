"""The endpoints of DESIGN §8. Each parses its input, awaits the engine's batchers, and answers JSON."""

from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import BadInput, NotAnImage
from . import images
from .engine import Engine
from .fastpath import dumps
from .schemas import (
    ID_MAX,
    K_MAX,
    ExplainRequest,
    HealthResponse,
    ItemResponse,
    ScoreRequest,
    SearchRequest,
    SearchResponse,
    StatsResponse,
    Verdict,
)

router = APIRouter()
ItemId = Path(..., ge=0, le=ID_MAX, description="A store id (0 .. 2**63 - 1).")


def _body(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI: the endpoint takes JSON of `schema` or a multipart upload in field `image`."""
    upload = {"type": "object", "required": ["image"],
              "properties": {"image": {"type": "string", "format": "binary"}, "k": {"type": "integer"},
                             "dedup": {"type": "boolean"}, "dedup_similarity": {"type": "number"}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        "multipart/form-data": {"schema": upload}}}}


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def json_response(data: Any, status: int = 200) -> Response:
    return Response(dumps(data), status_code=status, media_type="application/json")


@dataclass
class UploadOptions:
    """The form fields beside an upload's image."""

    dedup: bool = False
    dedup_similarity: float = 0.95


async def read_input(request: Request, schema: type[BaseModel]) -> tuple[bytes | None, Any, int]:
    """(image bytes, UploadOptions, k) for a multipart upload, or (None, parsed JSON model, k)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _read_upload(request)
    if kind in ("application/json", ""):
        try:
            parsed = schema.model_validate_json(await request.body() or b"null")
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
        return None, parsed, getattr(parsed, "k", 10)
    raise NotAnImage(f"content type {kind!r} not accepted: send JSON, or multipart/form-data with field `image`")


async def _read_upload(request: Request) -> tuple[bytes, UploadOptions, int]:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # starlette raises HTTPException(400) or MultiPartException for a malformed body
        if exc.__class__.__name__ == "BodyTooLarge":
            raise
        raise BadInput(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise BadInput("multipart upload needs the image file in the field `image`")
    def field(name: str) -> Any:
        return form.get(name) or request.query_params.get(name)

    options = UploadOptions(str(field("dedup") or "").lower() in ("1", "true", "on", "yes"),
                            parse_similarity(field("dedup_similarity")))
    return await upload.read(), options, parse_k(field("k"))


def _ranged(value: Any, default: Any, cast: Any, name: str, kind: str, low: Any, high: Any) -> Any:
    """A form field as a number in [low, high]; `default` when absent."""
    if value is None:
        return default
    try:
        number = cast(value)
    except (TypeError, ValueError):
        raise BadInput(f"{name} must be {kind} {low}..{high}, got {value!r}") from None
    if not low <= number <= high:
        raise BadInput(f"{name} must be {low}..{high}, got {number}")
    return number


def parse_similarity(value: Any) -> float:
    return float(_ranged(value, 0.95, float, "dedup_similarity", "a number", 0.5, 1))


def parse_k(value: Any) -> int:
    return int(_ranged(value, 10, int, "k", "an integer", 1, K_MAX))


async def query_vector(engine: Engine, data: bytes | None, parsed: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The query as a unit vector and a description of it."""
    if data is not None:
        return await engine.encode.submit(("image", data)), {"kind": "image", "bytes": len(data)}
    if getattr(parsed, "text", None) is not None:
        return await engine.encode.submit(("text", parsed.text)), {"kind": "text", "text": parsed.text}
    if getattr(parsed, "id", None) is not None:
        return await engine.vectors.call(engine.vector_of, parsed.id), {"kind": "id", "id": parsed.id}
    return engine.check_vector(parsed.embedding), {"kind": "embedding"}


@router.get("/health", response_model=HealthResponse, tags=["service"])
async def health(request: Request) -> Response:
    engine = engine_of(request)
    return json_response({"status": "ok", "version": __version__, "vectors": engine.store.rows,
                          "model": engine.model_name, "encoder_loaded": engine.encoder_loaded})


@router.get("/v1/stats", response_model=StatsResponse, tags=["service"])
async def stats(request: Request) -> Response:
    return json_response(await run_in_threadpool(engine_of(request).stats))


@router.post("/v1/score", response_model=Verdict, tags=["scores"], openapi_extra=_body(ScoreRequest))
async def score(request: Request) -> Response:
    """The NSFW verdict of an uploaded image or of an embedding."""
    engine = engine_of(request)
    engine.require_classifier()
    data, parsed, _ = await read_input(request, ScoreRequest)
    vector, _ = await query_vector(engine, data, parsed)
    result = await engine.vectors.submit((vector, 0, True))
    return json_response(result.verdict)


@router.post("/v1/search", response_model=SearchResponse, tags=["search"], openapi_extra=_body(SearchRequest))
async def search(request: Request) -> Response:
    """Nearest neighbours of an uploaded image, a text, a store id or an embedding, with their scores."""
    engine = engine_of(request)
    data, parsed, k = await read_input(request, SearchRequest)
    vector, query = await query_vector(engine, data, parsed)
    by_id, dedup = query["kind"] == "id", bool(getattr(parsed, "dedup", False))
    wanted = min(K_MAX, max(3 * k, k + 32)) if dedup else k  # candidates: duplicates fold into fewer groups
    result = await engine.vectors.submit((vector, min(wanted + by_id, engine.store.rows, K_MAX),
                                          query["kind"] != "text"))
    hits = result.hits[:wanted]
    if by_id:  # the item itself first, as in the CLI (similarity 1, even with exact copies in the store)
        hits = await engine.vectors.call(engine.searcher.item_first, parsed.id, result.hits, wanted)
    body: dict[str, Any] = {"query": query, "k": k, "verdict": result.verdict, "hits": hits[:k]}
    if dedup:
        from .collapse import collapse_for

        similarity = float(parsed.dedup_similarity)
        body["hits"], folded = await engine.vectors.call(collapse_for, engine.searcher, hits, similarity, k)
        body["dedup"] = {"similarity": similarity, "collapsed": folded}
    return json_response(body)


@router.post("/v1/explain", tags=["scores"], openapi_extra=_body(ExplainRequest))
async def explain(request: Request) -> Response:
    """The verdict plus the nearest labelled training examples and how many agree with it."""
    engine = engine_of(request)
    engine.require_classifier()
    data, parsed, k = await read_input(request, ExplainRequest)
    vector, query = await query_vector(engine, data, parsed)
    exclude = query.get("id")
    return json_response(dict(await engine.vectors.call(engine.explain, vector, k, exclude), query=query))


@router.get("/v1/items/{item_id}", response_model=ItemResponse, tags=["items"])
async def item(request: Request, item_id: int = ItemId) -> Response:
    """Metadata of a store item and its score."""
    engine = engine_of(request)
    meta = await run_in_threadpool(engine.item, item_id)
    verdict = None
    if engine.classifier is not None:  # the vector (a read of its row group's embeddings) only for a verdict
        vector = await engine.vectors.call(engine.vector_of, item_id)
        verdict = (await engine.vectors.submit((vector, 0, True))).verdict
    return json_response(images.jsonable(dict(meta, id=item_id, verdict=verdict)))


@router.get("/v1/items/{item_id}/image", tags=["items"], response_class=Response,
            responses={200: {"content": {"image/*": {}}}})
async def item_image(request: Request, item_id: int = ItemId) -> Response:
    """The stored image of an item (only images the store lists; remote URLs are not fetched)."""
    engine = engine_of(request)
    meta = await run_in_threadpool(engine.item, item_id)
    data, media_type = await run_in_threadpool(images.read_store_image, meta["uri"])
    return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})
