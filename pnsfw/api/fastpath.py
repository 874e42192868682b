"""The hot JSON requests of /v1/search and /v1/score as plain ASGI, skipping FastAPI's routing and pydantic.

FastAPI's routing, dependency solving and pydantic validation of a 256-number list
cost about as much CPU as the whole rest of a request, so the common request is
answered here: POST, `Content-Type: application/json`, a JSON object holding
`embedding` (a list of `dim` finite numbers) and, for /v1/search, an optional
integer `k` in 1..1000, and no other key. It gets the bytes the route would give
(same JSON, same status). Anything else (uploads, text or id queries, other
keys, bad values, no classifier) is passed on untouched, its body replayed, so
FastAPI validates it and answers exactly as before; the OpenAPI schema stays the
routes'. The middleware sits inside the metrics, token and body-limit ones.
"""

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic_core import from_json

from ..errors import BadInput, PnsfwError
from ..search.query import unit_vectors
from .engine import Engine
from .guards import ASGIApp, Receive, Scope, Send, send_json
from .schemas import K_MAX

PATHS = {"/v1/search": "search", "/v1/score": "score"}
KEYS = {"search": frozenset(("embedding", "k")), "score": frozenset(("embedding",))}


def dumps(data: Any) -> bytes:
    """The JSON bytes of every API answer (the routes' `json_response` uses this too)."""
    return json.dumps(data).encode()


def is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the already-read body first, then defers to the real one."""
    given = [False]

    async def again() -> dict[str, Any]:
        if given[0]:
            return await receive()
        given[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


def parse(kind: str, body: bytes, dim: int) -> tuple[np.ndarray, int] | None:
    """(vector, k) for a request the fast path answers, else None (FastAPI then validates it)."""
    try:
        data = from_json(body)  # jiter: ~10x faster than json.loads on a list of floats
    except ValueError:
        return None
    if type(data) is not dict or not data.keys() <= KEYS[kind]:
        return None
    embedding, k = data.get("embedding"), data.get("k", 10)
    if type(embedding) is not list or len(embedding) != dim or type(k) is not int or not 1 <= k <= K_MAX:
        return None
    if not all(type(x) is float or type(x) is int for x in embedding):  # strict, as the schema: no bool, no str
        return None
    try:
        return unit_vectors(embedding, dim)[0], k  # the route's own check and normalisation
    except BadInput:
        return None


@dataclass(frozen=True)
class RouteLabel:
    """What `scope["route"]` holds for a fast-path request: the route's path, as MetricsMiddleware reads it."""

    path: str


class FastPath:
    """Answers valid JSON-embedding requests of /v1/search and /v1/score; passes everything else on."""

    def __init__(self, app: ASGIApp, engine: Engine):
        self.app, self.engine = app, engine
        self.routes = {kind: RouteLabel(path) for path, kind in PATHS.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = PATHS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if kind is None or not is_json(scope["headers"]) or (kind == "score" and self.engine.classifier is None):
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:
            return
        parsed = parse(kind, body, self.engine.store.dim)
        if parsed is not None:
            try:
                payload = await self._answer(kind, *parsed)
            except PnsfwError:  # not expected for valid input; the route answers it with its error handlers
                payload = None
            if payload is not None:
                scope["route"] = self.routes[kind]  # MetricsMiddleware labels it by the route's path
                return await send_json(send, payload)
        await self.app(scope, replay(body, receive), send)

    async def _answer(self, kind: str, vector: np.ndarray, k: int) -> bytes:
        engine = self.engine
        if kind == "score":
            return dumps((await engine.vectors.submit((vector, 0, True))).verdict)
        result = await engine.vectors.submit((vector, min(k, engine.store.rows), True))
        return dumps({"query": {"kind": "embedding"}, "k": k, "verdict": result.verdict, "hits": result.hits[:k]})

