"""Stores on object storage (s3://, gs://, ...) through fsspec.

Credentials and endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, ...). Put-if-absent on S3 is PutObject with `If-None-Match: *` (s3fs `mode="create"`):
a 412 means another writer created the object first. Listings are never cached (a commit protocol must see
other writers' versions). Files that libraries want on local disk (a FAISS index, a model generation) are
downloaded once into a per-process cache: generations are immutable, so a cached copy never goes stale.

One filesystem instance (one client, one connection pool) serves every store of a URL scheme and options in a
process (`shared_fs`), so opening a store again costs its two requests, not a new S3 client. Reads go by byte
ranges with no read-ahead and no HEAD: a shard's footer and its size check are one suffix GET, a row group the
GETs of its column chunks (concurrent), a whole shard one GET (see read_tail, read_ranges, read_sized).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreError
from . import hooks
from .fs import Entry, FileSystem, write_failure

log = logging.getLogger("pnsfw.store")
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
PART_BYTES = 8 << 20  # a whole-file read of a known size goes as concurrent ranged GETs of at least this
PARTS = 4  # ... and at most this many (two were 1.3-1.5x faster than one GET of a 27 MB shard on SeaweedFS)
IO_THREADS = 8  # FsspecFS.map: requests in flight at once (listings of folders, footers of shards)
T = TypeVar("T")
R = TypeVar("R")
POOL_CONNECTIONS = 32  # per shared client: concurrent ranged GETs of reader threads (botocore's default: 10)
_SHARED: dict[tuple[int, str, str], Any] = {}
_SHARED_LOCK = threading.Lock()
_TOTAL = re.compile(r"/(\d+)$")


def _is_conflict(exc: BaseException) -> bool:
    """True when a conditional put lost to an object that exists (or is being created)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and str(response.get("Error", {}).get("Code")) in _CONFLICT_CODES:
            return True
        if "pre-condition" in str(seen).lower() or "precondition" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(exc, FileExistsError)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("LastModified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


def fsspec_options(protocol: str) -> dict[str, Any]:
    """Options of an fsspec filesystem for PROTOCOL: no caches across commits, S3 endpoint from the environment."""
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        options["use_listings_cache"] = False
        options["config_kwargs"] = {"max_pool_connections": POOL_CONNECTIONS}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def shared_fs(protocol: str, options: dict[str, Any]) -> Any:
    """The process's one fsspec filesystem for PROTOCOL and OPTIONS (created on first use; a forked child makes
    its own: an s3fs client does not survive a fork). No listing is cached (use_listings_cache=False)."""
    import fsspec

    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str))
    with _SHARED_LOCK:
        fs = _SHARED.get(key)
        if fs is None:
            fs = _SHARED[key] = fsspec.filesystem(protocol, **options)
        return fs


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path in it) of a source URL, configured as the store's filesystems are."""
    fs = shared_fs(url.split("://", 1)[0], fsspec_options(url.split("://", 1)[0]))
    return fs, str(fs._strip_protocol(url))


class FsspecFS(FileSystem):
    """A store under an fsspec URL; object stores are atomic per object, so writes are plain uploads."""

    def __init__(self, url: str, fs: Any = None):
        """`fs`: the fsspec filesystem to use (default: the process's shared one for the URL's scheme)."""
        self.root = url.rstrip("/")
        protocol = url.split("://", 1)[0]
        try:
            self.fs = fs if fs is not None else shared_fs(protocol, fsspec_options(protocol))
            self.base = str(self.fs._strip_protocol(self.root))
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from None
        self.protocol = protocol
        self.s3 = protocol in ("s3", "s3a")
        self._cache: Path | None = None

    def _p(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}" if rel else self.base

    def _get(self, rel: str, byte_range: str | None = None) -> tuple[bytes, int]:
        """One S3 GetObject (no HEAD first): (body, the object's size)."""
        return self._get_many(rel, [byte_range])[0]

    def _get_many(self, rel: str, byte_ranges: Sequence[str | None]) -> list[tuple[bytes, int]]:
        """Concurrent S3 GetObjects of one object, each (body, the object's size from its Content-Range)."""
        import asyncio

        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self._p(rel))

        async def get(byte_range: str | None) -> tuple[bytes, int]:
            extra = {"Range": byte_range} if byte_range else {}
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
            try:
                body: bytes = await response["Body"].read()
            finally:
                response["Body"].close()
            total = _TOTAL.search(str(response.get("ContentRange") or ""))
            return body, int(total.group(1)) if total else int(response.get("ContentLength", len(body)))

        async def every() -> list[tuple[bytes, int]]:
            return list(await asyncio.gather(*(get(r) for r in byte_ranges)))

        result: list[tuple[bytes, int]] = sync(self.fs.loop, every)
        return result

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        from concurrent.futures import ThreadPoolExecutor

        from ..concurrency import ordered_map

        with ThreadPoolExecutor(IO_THREADS, "store-io") as pool:
            yield from ordered_map(pool, fn, items, 2 * IO_THREADS)

    def read_bytes(self, rel: str) -> bytes:
        if self.s3:
            return self._get(rel)[0]
        data: bytes = self.fs.cat_file(self._p(rel))
        return data

    def read_sized(self, rel: str, size: int | None = None) -> bytes:
        if not self.s3 or size is None or size < 2 * PART_BYTES:
            return self.read_bytes(rel)
        step = max(PART_BYTES, -(-size // PARTS))
        parts = self._get_many(rel, [f"bytes={a}-{min(size, a + step) - 1}" for a in range(0, size, step)])
        if any(total != size for _, total in parts):  # the object is not the size expected: read what it is
            return self.read_bytes(rel)
        return b"".join(body for body, _ in parts)

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]]) -> Sequence[bytes]:
        if not ranges:
            return []
        if self.s3:  # one concurrent GET per non-empty range
            wanted = [(a, b) for a, b in ranges if b > a]
            bodies = iter(self._get_many(rel, [f"bytes={a}-{b - 1}" for a, b in wanted]) if wanted else [])
            return [next(bodies)[0] if b > a else b"" for a, b in ranges]
        path = self._p(rel)
        data: list[bytes] = self.fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                                               on_error="raise")
        return data

    def read_tail(self, rel: str, length: int) -> tuple[bytes, int]:
        if self.s3:
            try:
                return self._get(rel, f"bytes=-{length}")
            except OSError as exc:  # an empty object has no suffix range to give (416): read it whole
                if "Range" not in str(exc) and "416" not in str(exc):
                    raise
                return self._get(rel)
        size = int(self.fs.size(self._p(rel)))
        start = max(0, size - length)
        return bytes(self.fs.cat_file(self._p(rel), start=start, end=size)), size

    def write_file(self, rel: str, write: Callable[[Path], None], sync: bool = True) -> None:
        with tempfile.TemporaryDirectory(prefix="pnsfw-up-") as tmp:
            local = Path(tmp) / rel.rsplit("/", 1)[-1]
            write(local)
            try:
                hooks.pause(f"write:{rel}")
                self.fs.put_file(str(local), self._p(rel))
            except OSError as exc:
                raise write_failure(self.url(rel), exc) from None

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        try:
            hooks.pause(f"write:{rel}")
            if self.protocol in ("s3", "s3a"):
                self.fs.pipe_file(self._p(rel), data, mode="create")
                return True
            with self.fs.open(self._p(rel), "xb") as f:  # backends that support exclusive creation
                f.write(data)
            return True
        except Exception as exc:
            if _is_conflict(exc):
                return False
            if isinstance(exc, OSError):
                raise write_failure(self.url(rel), exc) from None
            raise

    def list(self, rel: str) -> list[Entry]:
        path = self._p(rel)
        try:
            infos = self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        entries = []
        for info in infos:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if not name or str(info["name"]).rstrip("/") == path.rstrip("/"):
                continue
            entries.append(Entry(name, int(info.get("size") or 0), _mtime(info), info.get("type") == "directory"))
        return sorted(entries, key=lambda e: e.name)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._p(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm(self._p(rel), recursive=True)
        except FileNotFoundError:
            pass

    def open_input(self, rel: str) -> Any:
        return self.fs.open(self._p(rel), "rb")

    def open_ranges(self, rel: str) -> Any:
        return self.fs.open(self._p(rel), "rb", cache_type="none")  # one ranged GET per read, no read-ahead

    def local_path(self, rel: str) -> Path:
        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="pnsfw-cache-"))
        local = self._cache / rel
        if local.exists():
            return local
        files = [f for f in self.walk_files(rel)] if not self.fs.isfile(self._p(rel)) else [rel]
        for file in files:
            target = self._cache / file
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._p(file), str(target))
        local.mkdir(parents=True, exist_ok=True) if not files else None
        return local

    def put_tree(self, local_dir: Path, rel: str) -> None:
        try:
            hooks.pause(f"write:{rel}")
            for path in sorted(local_dir.rglob("*")):
                if path.is_file():
                    self.fs.put_file(str(path), self._p(f"{rel}/{path.relative_to(local_dir).as_posix()}"))
        except OSError as exc:
            raise write_failure(self.url(rel), exc) from None
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)

    def copy(self, src: str, dst: str) -> None:
        try:
            hooks.pause(f"write:{dst}")
            if self.fs.isfile(self._p(src)):
                self.fs.copy(self._p(src), self._p(dst))
                return
            for file in self.walk_files(src):
                self.fs.copy(self._p(file), self._p(dst + file[len(src):]))
        except OSError as exc:
            raise write_failure(self.url(dst), exc) from None
