"""Review endpoints beside routes.py: item thumbnails (and, with the store's labels, the review queue)."""

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from . import images, thumbs
from .engine import Engine

router = APIRouter()
ItemId = Path(..., ge=0, description="A store id.")


def install(app: FastAPI) -> None:
    """Add the review routes and their state (the thumbnail cache) to the app."""
    app.state.thumbs = thumbs.ThumbCache()
    app.include_router(router)


def thumbnail(engine: Engine, cache: thumbs.ThumbCache, item_id: int) -> bytes:
    """The cached thumbnail of a store item, made from its stored image on a miss."""
    uri = engine.item(item_id)["uri"]
    key = (item_id, uri)
    data = cache.get(key)
    if data is None:
        data = thumbs.make_thumb(images.read_store_image(uri)[0])
        cache.put(key, data)
    return data


@router.get("/v1/items/{item_id}/thumb", tags=["items"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
async def item_thumb(request: Request, item_id: int = ItemId) -> Response:
    """A small JPEG of the stored image (256 px on the long side), cached in memory; what the page shows."""
    data = await run_in_threadpool(thumbnail, request.app.state.engine, request.app.state.thumbs, item_id)
    return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})
