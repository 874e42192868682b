"""A file or folder an import reads: a local path or an fsspec URL (s3://, gs://, file://), read-only.

Local paths are opened as plain files (memory-mapped Parquet, readinto straight from the page cache); URLs
through fsspec, configured as the store's own filesystems are (AWS_ENDPOINT_URL, credentials from the
environment), and read in large sequential blocks so a stream costs few requests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, Any

import pyarrow.parquet as pq

from ..errors import SourceError

BLOCK = 32 << 20  # bytes per request of a remote stream


@dataclass(frozen=True)
class Place:
    fs: Any  # an fsspec filesystem, or None for a local path
    path: str
    protocol: str = "file"

    @classmethod
    def of(cls, given: str) -> Place:
        """The place a PATH argument names (file:// is a local path)."""
        if given.startswith("file://"):
            given = given[len("file://"):]
        if "://" not in given:
            return cls(None, os.path.abspath(given))
        from ..store.remote import url_fs

        try:
            fs, path = url_fs(given)
        except (ImportError, ValueError) as exc:
            raise SourceError(f"cannot open {given}: {exc}") from None
        return cls(fs, str(path).rstrip("/"), given.split("://", 1)[0])

    def __str__(self) -> str:
        return self.path if self.fs is None else f"{self.protocol}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> Place:
        return Place(self.fs, f"{self.path.rstrip('/')}/{name}", self.protocol)

    def exists(self) -> bool:
        return os.path.exists(self.path) if self.fs is None else bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        return os.path.isdir(self.path) if self.fs is None else bool(self.fs.isdir(self.path))

    def children(self) -> list[Place]:
        """The entries of a folder, by name ([] for a file or a missing folder)."""
        if not self.is_dir():
            return []
        if self.fs is None:
            return [self.child(n) for n in sorted(os.listdir(self.path))]
        names = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)}
        return [self.child(n) for n in sorted(names) if n]

    def files(self, suffix: str) -> list[Place]:
        """Every file under a folder (recursively) whose name ends with suffix, in path order."""
        if self.fs is None:
            found = [os.path.join(d, f) for d, _, names in os.walk(self.path) for f in names if f.endswith(suffix)]
            return [Place(None, p) for p in sorted(found)]
        return [Place(self.fs, str(p), self.protocol) for p in sorted(self.fs.find(self.path)) if
                str(p).endswith(suffix)]

    def open(self) -> IO[bytes]:
        if self.fs is None:
            return open(self.path, "rb")
        handle: IO[bytes] = self.fs.open(self.path, "rb", block_size=BLOCK, cache_type="readahead")
        return handle

    def parquet(self) -> pq.ParquetFile:
        """The Parquet file here (remote ones read through one open handle, closed when the reader is)."""
        if self.fs is None:
            return pq.ParquetFile(self.path, memory_map=True)
        return pq.ParquetFile(self.fs.open(self.path, "rb"))
