"""ASGI middleware: request metrics, the bearer-token guard, and the upload size limit.

Pure ASGI (not BaseHTTPMiddleware) so a too-large body is refused from its
Content-Length, or as soon as the streamed bytes pass the limit, before the
whole body is read.
"""

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .metrics import Metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
PUBLIC_PATHS = ("/health", "/", "/docs", "/redoc", "/openapi.json", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/", "/docs/")


async def send_json(send: Send, body: bytes, status: int = 200, headers: tuple = ()) -> None:
    """A whole JSON response (already serialised) through raw ASGI."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, error: str, detail: str, headers: tuple = ()) -> None:
    await send_json(send, json.dumps({"error": error, "detail": detail}).encode(), status, headers)


class MetricsMiddleware:
    """Counts requests and observes latency per route template (not per raw path, to bound label count)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.requests.inc(route=path, method=scope["method"], status=str(status[0]))
            self.metrics.latency.observe(time.perf_counter() - started, route=path)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class TokenGuard:
    """With a token set, every non-public request needs `Authorization: Bearer <token>` (constant-time compare)."""

    def __init__(self, app: ASGIApp, token: "str | None"):
        self.app, self.token = app, token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or is_public(scope["path"]):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credential = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token):
            return await self.app(scope, receive, send)
        await send_error(send, 401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                         ((b"www-authenticate", b"Bearer"),))


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over `limit` bytes: from Content-Length at once, or while streaming a chunked body.

    The 413 goes out first, then the rest of the body is read and dropped (up to DRAIN_MAX bytes and
    DRAIN_SECONDS) before the response ends and the connection closes: a client that sends its whole body before
    reading (Python's urllib) would otherwise get "connection reset by peer" instead of the answer."""

    DRAIN_MAX = 256 << 20
    DRAIN_SECONDS = 30.0

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > self.limit:
            return await self._refuse(send, receive, declared)
        seen, started = [0], [False]

        async def counted() -> dict[str, Any]:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.limit:
                raise BodyTooLarge()
            return message

        async def watched(message: dict[str, Any]) -> None:
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started[0]:
                await self._refuse(send, receive, None if declared is None else declared - seen[0])

    async def _refuse(self, send: Send, receive: Receive, remaining: "int | None") -> None:
        mb = self.limit / (1024 * 1024)
        body = json.dumps({"error": "too_large", "detail": f"request body over the {mb:g} MB limit "
                                                           f"(--max-upload-mb)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        if remaining is None or remaining <= self.DRAIN_MAX:  # a body of GBs is not read: that client gets a reset
            try:
                await asyncio.wait_for(_drain(receive, self.DRAIN_MAX), self.DRAIN_SECONDS)
            except asyncio.TimeoutError:
                pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the request body until it ends, the client leaves, or `limit` bytes went by."""
    total = 0
    while total <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        total += len(message.get("body", b""))
