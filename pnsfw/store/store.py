"""The store: a folder with a manifest that lists committed shards.

A file becomes part of the store only when a manifest that lists it has been
renamed into place, so a crash at any moment leaves the last commit intact.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import SpaceMismatch, StoreError
from . import shards
from .files import atomic_write_json, sha256_file
from .lock import WriteLock
from .projection import Projection, space_fingerprint

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _empty_manifest() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "created": time.time(), "encoder": None, "projection": None,
            "next_id": 0, "shards": [], "errors": []}


class Store:
    """Read access to a store folder; `writer()` gives the one write handle."""

    def __init__(self, root: "str | Path"):
        self.root = Path(root)
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return _empty_manifest()
        import json

        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise StoreError(f"{path} has format {manifest.get('format')!r}; this pnsfw reads format {FORMAT_VERSION}")
        return manifest

    @classmethod
    def open(cls, root: "str | Path") -> "Store":
        """Open an existing, non-empty store or fail with a clear message."""
        store = cls(root)
        if not (store.root / MANIFEST).exists():
            raise StoreError(f"no store at {store.root} (run `pnsfw index SOURCE --store {store.root}` first)")
        return store

    def refresh(self) -> None:
        self.manifest = self._read_manifest()

    @property
    def exists(self) -> bool:
        return (self.root / MANIFEST).exists()

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def dim(self) -> int:
        return int(self.manifest["projection"]["dim"])

    @property
    def space(self) -> str:
        """Fingerprint of the embedding space (encoder + projection)."""
        if not self.manifest["projection"]:
            raise StoreError(f"store {self.root} has no vectors yet")
        return space_fingerprint(self.manifest["encoder"]["fingerprint"], self.manifest["projection"]["fingerprint"])

    def check_space(self, fingerprint: str, what: str) -> None:
        if fingerprint != self.space:
            raise SpaceMismatch(f"{what} was built in embedding space {fingerprint}, but store {self.root} is in "
                                f"space {self.space} (another CLIP model or projection)")

    def projection(self) -> Projection:
        return Projection.load(self.root / "projection.npy", self.manifest["projection"]["kind"])

    def shard_paths(self) -> list[Path]:
        return [self.root / "shards" / s["name"] for s in self.manifest["shards"]]

    def error_paths(self) -> list[Path]:
        return [self.root / "errors" / e["name"] for e in self.manifest["errors"]]

    def table(self, columns: "list[str] | None" = None) -> pa.Table:
        """All committed rows (without the embedding unless asked)."""
        if columns is None:
            columns = [n for n in shards.shard_schema(1).names if n != "embedding"]
        tables = [shards.read_table(p, columns) for p in self.shard_paths()]
        return pa.concat_tables(tables) if tables else shards.shard_schema(1).empty_table().select(columns)

    def errors(self) -> pa.Table:
        tables = [shards.read_table(p) for p in self.error_paths()]
        return pa.concat_tables(tables) if tables else shards.ERROR_SCHEMA.empty_table()

    def iter_vectors(self, paths: "list[Path] | None" = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids int64, vectors fp16 (n, dim)) one row group at a time."""
        for path in self.shard_paths() if paths is None else paths:
            for batch in shards.iter_batches(path, ["id", "embedding"]):
                ids = batch.column(0).to_numpy()
                yield ids, shards.embedding_matrix(batch.column(1), self.dim)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors())
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float16)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def known_uris(self) -> set[str]:
        """Every uri already committed, as a row or an error (so it is not tried again)."""
        uris = set(self.table(["uri"]).column("uri").to_pylist())
        uris.update(self.errors().column("uri").to_pylist())
        return uris

    @contextmanager
    def writer(self) -> Iterator["StoreWriter"]:
        self.root.mkdir(parents=True, exist_ok=True)
        with WriteLock(self.root):
            self.refresh()
            writer = StoreWriter(self)
            writer.remove_orphans()
            yield writer


class StoreWriter:
    """Appends shards and error files; each `commit` is one atomic manifest update."""

    def __init__(self, store: Store):
        self.store = store

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    def remove_orphans(self) -> None:
        """Delete files a crashed writer left behind that no manifest lists."""
        listed = {p.name for p in self.store.shard_paths() + self.store.error_paths()}
        for folder in ("shards", "errors"):
            for path in (self.store.root / folder).glob("*"):
                if path.name not in listed:
                    path.unlink()

    def set_space(self, encoder: dict[str, Any], projection: Projection) -> None:
        """Record the encoder and projection once; later runs must match them."""
        current = self.manifest["encoder"]
        if current is not None:
            if current["fingerprint"] != encoder["fingerprint"]:
                raise SpaceMismatch(f"store {self.store.root} was built with CLIP model {current['name']} "
                                    f"({current['fingerprint'][:12]}), not {encoder['name']} "
                                    f"({encoder['fingerprint'][:12]}); use another --store")
            return
        projection.save(self.store.root / "projection.npy")
        self.manifest["encoder"] = encoder
        self.manifest["projection"] = {"kind": projection.kind, "fingerprint": projection.fingerprint,
                                       "dim": projection.dim, "width": projection.width}
        self._write_manifest()

    def next_ids(self, count: int) -> np.ndarray:
        start = self.manifest["next_id"]
        return np.arange(start, start + count, dtype=np.int64)

    def commit(self, rows: "pa.Table | None", errors: "pa.Table | None") -> None:
        """Write a shard and/or an error file, then list them in the manifest in one rename."""
        if rows is not None and rows.num_rows:
            name = self._write("shards", rows)
            ids = rows.column("id")
            self.manifest["shards"].append(dict(name, min_id=ids[0].as_py(), max_id=ids[-1].as_py()))
            self.manifest["next_id"] = ids[-1].as_py() + 1
        if errors is not None and errors.num_rows:
            self.manifest["errors"].append(self._write("errors", errors))
        self._write_manifest()

    def _write(self, folder: str, table: pa.Table) -> dict[str, Any]:
        entries = self.manifest[folder]
        number = int(entries[-1]["name"][5:10]) + 1 if entries else 0
        path = self.store.root / folder / f"part-{number:05d}.parquet"
        shards.write_parquet(table, path)
        return {"name": path.name, "rows": table.num_rows, "sha256": sha256_file(path),
                "bytes": path.stat().st_size, "committed": time.time()}

    def _write_manifest(self) -> None:
        atomic_write_json(self.store.root / MANIFEST, self.manifest)
