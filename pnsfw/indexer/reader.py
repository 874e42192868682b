"""Reader + decoder stage, run in worker processes: item -> Result (pixels, or a reason)."""

import hashlib
import http.client
import urllib.error
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import NamedTuple

import numpy as np

from ..concurrency import Executor, ordered_map
from .decode import DEFAULT_MAX_PIXELS, DecodeFailure, decode
from .fetch import DownloadTooLarge
from .sources import Item, read_bytes, stage_of

DEFAULT_MAX_DOWNLOAD = 20_000_000


class Result(NamedTuple):
    item: Item
    pixels: np.ndarray | None  # uint8 (R, R, 3) when the image could be used
    sha256: str = ""
    width: int = 0
    height: int = 0
    stage: str = ""
    reason: str = ""
    detail: str = ""


def _read(item: Item, timeout: float, max_download: int) -> bytes:
    if item.problem is not None:
        raise DecodeFailure(*item.problem)
    try:
        return read_bytes(item, timeout, max_download)
    except urllib.error.HTTPError as exc:
        raise DecodeFailure("http_error", f"HTTP {exc.code} {exc.reason}") from None
    except DownloadTooLarge as exc:
        raise DecodeFailure("too_large", str(exc)) from None
    except TimeoutError as exc:
        raise DecodeFailure("timeout", str(exc)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        kind = "timeout" if isinstance(reason, TimeoutError) else "unreachable"
        raise DecodeFailure(kind, str(reason)) from None
    except http.client.HTTPException as exc:
        raise DecodeFailure("bad_response", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise DecodeFailure("unreadable", exc.strerror or str(exc)) from None
    except (ValueError, UnicodeError) as exc:  # a path or URL urllib/open cannot take
        raise DecodeFailure("bad_uri", str(exc)) from None


def process_item(item: Item, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, timeout: float = 10.0,
                 max_download: int = DEFAULT_MAX_DOWNLOAD) -> Result:
    """Read and decode one item; every failure becomes a Result with a reason."""
    try:
        data = _read(item, timeout, max_download)
    except DecodeFailure as failure:
        return Result(item, None, stage=stage_of(item), reason=failure.reason, detail=failure.detail)
    digest = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode(data, size, max_pixels)
    except DecodeFailure as failure:
        return Result(item, None, digest, stage="decode", reason=failure.reason, detail=failure.detail)
    except MemoryError:
        return Result(item, None, digest, stage="decode", reason="decompression_bomb", detail="out of memory")
    except Exception as exc:  # a decoder bug on one file must not stop a million-file run
        return Result(item, None, digest, stage="decode", reason="corrupt", detail=f"{type(exc).__name__}: {exc}")
    return Result(item, decoded.pixels, digest, decoded.width, decoded.height)


def process_chunk(items: list[Item], size: int, max_pixels: int, timeout: float,
                  max_download: int = DEFAULT_MAX_DOWNLOAD) -> list[Result]:
    return [process_item(item, size, max_pixels, timeout, max_download) for item in items]


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def decoded_stream(items: Iterable[Item], work: Callable[[list[Item]], list[Result]], pool: Executor | None,
                   chunk: int = 16, depth: int = 8) -> Iterator[Result]:
    """Results in input order, with at most `depth` chunks in flight (bounded memory)."""
    for results in ordered_map(pool, work, _chunks(items, chunk), depth):
        yield from results
