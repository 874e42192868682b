"""The FastAPI app: `create_app(store, model, settings)`; routes of DESIGN §8; errors as 4xx JSON."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..concurrency import quiet_collector
from ..errors import PnsfwError
from ..store import Store
from . import review, routes
from .docs import add_docs
from .engine import Engine, Settings
from .fastpath import FastPath
from .guards import BodyLimit, MetricsMiddleware, TokenGuard
from .schemas import ErrorResponse

STATIC = Path(__file__).parent / "static"
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 415, 422)}


def create_app(store: "Store | str | Path", model: str | None = None, settings: Settings | None = None) -> FastAPI:
    """Build the API for one store and one classifier (None: `default` or the store's only model)."""
    store = store if isinstance(store, Store) else Store.open(store)
    settings = settings or Settings()
    engine = Engine(store, model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        with quiet_collector():  # each full collection walked torch's objects with the event loop stopped
            yield
        await engine.stop()

    app = FastAPI(title="pnsfw", version=__version__, lifespan=lifespan, responses=ERRORS,
                  docs_url=None, redoc_url=None,  # docs.py serves both without a CDN
                  description="NSFW scores and nearest neighbours of a pnsfw store. Uploads: multipart field "
                              "`image`. With PNSFW_API_TOKEN set, send `Authorization: Bearer <token>`.")
    app.state.engine = engine
    _add_error_handlers(app)
    if settings.fast_path:  # innermost: the token guard, body limit and metrics still see every request
        app.add_middleware(FastPath, engine=engine)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(TokenGuard, token=settings.token)
    app.add_middleware(MetricsMiddleware, metrics=engine.metrics)
    app.include_router(routes.router)
    review.install(app)
    add_docs(app)
    _add_page(app, engine)
    return app


def _add_page(app: FastAPI, engine: Engine) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> Response:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


ERROR_KINDS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
               413: "too_large", 415: "not_image", 422: "invalid"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PnsfwError)
    async def domain(request: Request, exc: PnsfwError) -> JSONResponse:
        return error_response(exc.http_status, ERROR_KINDS.get(exc.http_status, "bad_request"), str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return error_response(422, "invalid", fields)

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, ERROR_KINDS.get(exc.status_code, "error"), exc.detail)
