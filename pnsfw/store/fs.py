"""The store's file system: a local folder (os calls) or any fsspec URL (s3://, gs://, file://).

Every path the store passes here is relative to the store root, with `/` separators. The operations are
the few a commit protocol needs: atomic whole-file writes, put-if-absent (O_EXCL-style `link` locally,
`If-None-Match: *` on S3), listing with ages, and a local path for libraries that want one (FAISS, Keras).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import StoreError
from . import hooks
from .files import fsync

T = TypeVar("T")
R = TypeVar("R")
WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EDQUOT: "disk quota exceeded"}


@dataclass(frozen=True)
class Entry:
    """One child of a listed folder."""

    name: str
    size: int
    mtime: float
    is_dir: bool


def write_failure(url: str, exc: OSError) -> StoreError:
    """An OSError of a write as the one-line error the user sees (the store itself is unchanged)."""
    reason = WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
    return StoreError(f"cannot write {url}: {reason}; nothing was committed, the store is unchanged")


class FileSystem:
    """Operations on paths relative to a store root. Subclasses: LocalFS, FsspecFS."""

    root: str
    local = False

    def url(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def write_file(self, rel: str, write: Callable[[Path], None], sync: bool = True) -> None:
        """Call write(local_tmp_path), then make the file appear at rel in one step (sync=False: the caller
        makes the folder durable later with sync_dir, once for many files)."""
        raise NotImplementedError

    def sync_dir(self, rel: str) -> None:
        """Make earlier renames in folder rel durable (object stores: nothing to do)."""

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """Create rel with data unless it exists; False when another writer created it first."""
        raise NotImplementedError

    def list(self, rel: str) -> list[Entry]:
        """Direct children of folder rel (empty when it does not exist)."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove a file or a whole folder; missing is fine."""
        raise NotImplementedError

    def open_input(self, rel: str) -> Any:
        """Something pyarrow.parquet.ParquetFile reads: a local path or a seekable file object."""
        raise NotImplementedError

    def open_ranges(self, rel: str) -> Any:
        """Like open_input, for reading a few byte ranges (a footer, one row group) with no read-ahead."""
        return self.open_input(rel)

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]]) -> Sequence[bytes]:
        """Bytes [start, end) of file rel for each range (object stores: one concurrent ranged GET each)."""
        raise NotImplementedError

    def read_tail(self, rel: str, length: int) -> tuple[bytes, int]:
        """(the last `length` bytes of file rel, or all of a shorter file; its size) in one request (a Parquet
        footer and the size check of a shard at once). FileNotFoundError when it is missing."""
        raise NotImplementedError

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn over items (requests of this file system), results in input order: in turn on a local disk,
        a few at a time on an object store (round trips overlap; read-ahead bounded)."""
        return map(fn, items)

    def read_sized(self, rel: str, size: int | None = None) -> bytes:
        """All of file rel (what a reader of most of a shard wants on an object store): one GET, or with the
        `size` it should have, a few concurrent ranged GETs (a file of another size is read whole)."""
        return self.read_bytes(rel)

    def local_path(self, rel: str) -> Path:
        """A local copy of file or folder rel (the file itself for a local store)."""
        raise NotImplementedError

    def put_tree(self, local_dir: Path, rel: str) -> None:
        """Make the files of local_dir appear under folder rel (which must not exist yet)."""
        raise NotImplementedError

    def copy(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def staging_dir(self, rel: str) -> Path:
        """A fresh local folder to fill before put_tree (object stores: a local temporary folder)."""
        return Path(tempfile.mkdtemp(prefix="pnsfw-stage-"))

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write(tmp: Path) -> None:
            tmp.write_bytes(data)

        self.write_file(rel, write)

    def walk_files(self, rel: str) -> Iterator[str]:
        """Every file below folder rel, as paths relative to the root."""
        for entry in self.list(rel):
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir:
                yield from self.walk_files(child)
            else:
                yield child


class LocalFS(FileSystem):
    """A store folder on a local (or mounted) file system: fsync + rename for atomicity, link for put-if-absent."""

    local = True

    def __init__(self, root: str | Path):
        self.path = Path(root).expanduser()
        self.root = str(root)

    def _p(self, rel: str) -> Path:
        return self.path / rel if rel else self.path

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    @contextmanager
    def _tmp(self, rel: str) -> Iterator[Path]:
        path = self._p(rel)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
        except OSError as exc:
            raise write_failure(str(path), exc) from None
        finally:
            tmp.unlink(missing_ok=True)

    def write_file(self, rel: str, write: Callable[[Path], None], sync: bool = True) -> None:
        with self._tmp(rel) as tmp:
            write(tmp)
            fsync(tmp)
            hooks.pause(f"write:{rel}")
            os.replace(tmp, self._p(rel))
            if sync:
                fsync(tmp.parent)

    def sync_dir(self, rel: str) -> None:
        if self._p(rel).is_dir():
            fsync(self._p(rel))

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        with self._tmp(rel) as tmp:
            hooks.pause(f"write:{rel}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self._p(rel))  # atomic, fails if the name exists: never a half-written version
            except FileExistsError:
                return False
            fsync(tmp.parent)
            return True

    def list(self, rel: str) -> list[Entry]:
        try:
            with os.scandir(self._p(rel)) as it:
                entries = []
                for e in it:
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    entries.append(Entry(e.name, st.st_size, st.st_mtime, e.is_dir()))
                return sorted(entries, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_ranges(self, rel: str, ranges: Sequence[tuple[int, int]]) -> Sequence[bytes]:
        with open(self._p(rel), "rb") as f:
            return [os.pread(f.fileno(), end - start, start) for start, end in ranges]

    def read_tail(self, rel: str, length: int) -> tuple[bytes, int]:
        with open(self._p(rel), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - length)
            return os.pread(f.fileno(), size - start, start), size

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def size(self, rel: str) -> int:
        return self._p(rel).stat().st_size

    def delete(self, rel: str) -> None:
        path = self._p(rel)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def open_input(self, rel: str) -> Any:
        return str(self._p(rel))

    def local_path(self, rel: str) -> Path:
        return self._p(rel)

    def put_tree(self, local_dir: Path, rel: str) -> None:
        target = self._p(rel)
        try:
            hooks.pause(f"write:{rel}")
            target.parent.mkdir(parents=True, exist_ok=True)
            for path in local_dir.rglob("*"):
                if path.is_file():
                    fsync(path)
            os.rename(local_dir, target)  # the staging folder lies inside the store: one rename
            fsync(target.parent)
        except OSError as exc:
            raise write_failure(str(target), exc) from None

    def copy(self, src: str, dst: str) -> None:
        source, target = self._p(src), self._p(dst)
        try:
            hooks.pause(f"write:{dst}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copyfile(source, target)
        except OSError as exc:
            raise write_failure(str(target), exc) from None

    def staging_dir(self, rel: str) -> Path:
        """A fresh folder inside the store (same file system, so put_tree is a rename)."""
        parent = self._p(rel)
        try:
            hooks.pause(f"write:{rel}")
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=parent))
        except OSError as exc:
            raise write_failure(str(parent), exc) from None


def open_fs(location: str | Path) -> FileSystem:
    """A plain path or file:// -> LocalFS; any other URL -> FsspecFS."""
    text = str(location)
    if text.startswith("file://"):
        return LocalFS(text[len("file://"):])
    if "://" not in text:
        return LocalFS(text)
    from .remote import FsspecFS

    return FsspecFS(text)


def read_text_or_none(fs: FileSystem, rel: str) -> str | None:
    try:
        return fs.read_bytes(rel).decode()
    except FileNotFoundError:
        return None


def open_binary(fs: FileSystem, rel: str) -> IO[bytes]:
    source = fs.open_input(rel)
    if isinstance(source, str):
        return open(source, "rb")
    stream: IO[bytes] = source
    return stream
