"""http(s) fetches bounded in total time and size.

`timeout` bounds the whole fetch (connect, headers, body), not one socket read: a watchdog timer shuts the
connection's sockets down at the deadline, so a server trickling bytes cannot hold an item. The body is
read in pieces and refused past `max_bytes` (also up front from Content-Length), so a huge body costs
no memory. No process-wide socket default timeout is touched.
"""

import http.client
import socket
import threading
import time
import urllib.request
from typing import Any

USER_AGENT = "pnsfw/0.1 (+https://github.com/pnsfw)"
PIECE = 1 << 16


class DownloadTooLarge(Exception):
    """The body is larger than --max-download."""


class _Deadline:
    """The end time of one fetch, and the sockets to shut down when it passes."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError(f"no complete answer within {self.seconds:g} s")
        return left

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            if sock is not None:
                self._sockets.append(sock)
        if self.expired:
            self._expire()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def _connection(base: type, deadline: _Deadline) -> Any:
    """A connection factory for urllib's do_open: each connect gets the time left and is watched."""
    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        connection = base(host, **kwargs)
        connect = connection.connect

        def bounded_connect() -> None:
            connection.timeout = deadline.remaining()
            connect()
            deadline.watch(connection.sock)

        connection.connect = bounded_connect
        return connection

    return make


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: Any) -> Any:
        return self.do_open(_connection(http.client.HTTPConnection, self.deadline), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: Any) -> Any:
        return self.do_open(_connection(http.client.HTTPSConnection, self.deadline), req, context=self._context)  # type: ignore[attr-defined]


def _body(response: Any, max_bytes: int, deadline: _Deadline) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise DownloadTooLarge(f"Content-Length {int(length):,} bytes > --max-download {max_bytes:,}")
    pieces, total = [], 0
    while piece := response.read1(PIECE):
        deadline.remaining()
        total += len(piece)
        if total > max_bytes:
            raise DownloadTooLarge(f"body over --max-download {max_bytes:,} bytes")
        pieces.append(piece)
    deadline.remaining()  # a shut-down socket ends like EOF: it is a timeout, not a short body
    return b"".join(pieces)


def read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET url within `timeout` seconds in total, at most `max_bytes` of body (redirects followed)."""
    deadline = _Deadline(timeout)
    try:
        opener = urllib.request.build_opener(_HTTP(deadline), _HTTPS(deadline))
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with opener.open(request, timeout=deadline.remaining()) as response:
                return _body(response, max_bytes, deadline)
        except (OSError, http.client.HTTPException, AttributeError, ValueError):
            if deadline.expired:  # whatever the shut-down socket raised, the cause is the deadline
                raise TimeoutError(f"no complete answer within {timeout:g} s") from None
            raise
    finally:
        deadline.cancel()
