"""Appends: shards and error parts staged under unique names, then listed by one manifest commit."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import SpaceMismatch
from . import hooks, shards
from .files import sha256_file
from .projection import Projection
from .records import Manifest, Part, Shard, Space
from .store import Store, writer_token

log = logging.getLogger("pnsfw.store")


@dataclass
class Staged:
    """A file written under its final, unique name but not yet listed by a manifest."""

    folder: str
    name: str
    rows: int
    sha256: str
    bytes: int


def stage_table(store: Store, folder: str, number: int, table: pa.Table, metadata: dict[bytes, bytes]) -> Staged:
    """Write table as FOLDER/part-NNNNN-TOKEN.parquet (unique: a racing writer never overwrites it)."""
    name = f"part-{number:05d}-{writer_token()}.parquet"
    digest: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        shards.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), tmp)
        digest["sha256"], digest["bytes"] = sha256_file(tmp), tmp.stat().st_size

    store.fs.write_file(f"{folder}/{name}", write)
    hooks.pause(f"staged:{folder}")
    return Staged(folder, name, table.num_rows, digest["sha256"], digest["bytes"])


@dataclass
class _Pending:
    shard: Staged | None
    table: pa.Table | None


@dataclass
class StagedCommit:
    """What one `commit` lists: a staged shard (with its rows, for renumbering) and a staged error part."""

    rows: _Pending
    error: Staged | None
    reasons: dict[str, int]


class StoreWriter:
    """Appends shards and error parts; each `commit` is one manifest version."""

    def __init__(self, store: Store):
        self.store = store

    @property
    def manifest(self) -> Manifest:
        return self.store.manifest

    def set_space(self, encoder: dict[str, Any], projection: Projection) -> None:
        """Record the encoder and projection once; later runs must match them."""
        current = self.manifest.space
        if current is not None:
            self._check_encoder(current, encoder)
            return
        space = Space(dict(encoder), {"kind": projection.kind, "fingerprint": projection.fingerprint,
                                      "dim": projection.dim, "width": projection.width})
        self._write_projection(projection)

        def change(manifest: Manifest) -> Manifest | None:
            if manifest.space is not None:  # a racing writer created the store first
                self._check_encoder(manifest.space, encoder)
                if manifest.space.fingerprint != space.fingerprint:
                    raise SpaceMismatch(f"store {self.store.root} was just created by another writer with another "
                                        "projection; rerun to use it")
                return None
            manifest.space = space
            return manifest

        self.store.commit(change, "the embedding space")

    def _check_encoder(self, current: Space, encoder: dict[str, Any]) -> None:
        if current.encoder["fingerprint"] != encoder["fingerprint"]:
            raise SpaceMismatch(f"store {self.store.root} was built with CLIP model {current.encoder['name']} "
                                f"({str(current.encoder['fingerprint'])[:12]}), not {encoder['name']} "
                                f"({str(encoder['fingerprint'])[:12]}); use another --store")

    def _write_projection(self, projection: Projection) -> None:
        import io

        buffer = io.BytesIO()
        np.save(buffer, projection.packed())
        if not self.store.fs.put_if_absent("projection.npy", buffer.getvalue()):
            # left by a run that died before committing its space, or by a racing creator (the manifest
            # check in set_space refuses a mismatch; store.projection() checks the fingerprint on read)
            self.store.fs.write_bytes("projection.npy", buffer.getvalue())

    def next_ids(self, count: int) -> np.ndarray:
        start = self.manifest.next_id
        return np.arange(start, start + count, dtype=np.int64)

    def commit(self, rows: pa.Table | None, errors: pa.Table | None) -> None:
        """Stage a shard and/or an error part, then list them in one manifest version."""
        self.commit_staged(self.stage(rows, errors))

    def stage(self, rows: pa.Table | None, errors: pa.Table | None,
              numbers: tuple[int, int] | None = None) -> StagedCommit:
        """Write a shard and/or an error part, listed by nothing yet (commit_staged lists them). Several may be
        staged at once from threads when each gets its own part `numbers` (shard, error part)."""
        base = self.manifest
        shard_number, error_number = numbers or (base.next_part(base.shards), base.next_part(base.errors))
        table = shards.normalize_rows(rows, self.store.dim) if rows is not None and rows.num_rows else None
        meta = {b"pnsfw.space": json.dumps(self.store.space_info.__dict__).encode()}
        shard = stage_table(self.store, "shards", shard_number, table, meta) if table is not None else None
        error = None
        if errors is not None and errors.num_rows:
            error = stage_table(self.store, "errors", error_number, errors, {})
        return StagedCommit(_Pending(shard, table), error, _reasons(errors))

    def commit_staged(self, staged: StagedCommit) -> None:
        """List a staged shard and error part in one manifest version (renumbering ids another writer took)."""
        pending, error = staged.rows, staged.error
        if pending.shard is None and error is None:
            return

        def change(manifest: Manifest) -> Manifest:
            if pending.shard is not None and pending.table is not None:
                if int(pending.table.column("id")[0].as_py()) != manifest.next_id:
                    # another writer took these ids: renumber our part
                    pending.table, pending.shard = self._renumber(pending.table, pending.shard, manifest)
                self._append_shard(manifest, pending.shard, pending.table)
            if error is not None:
                manifest.errors.append(Part(error.name, error.rows, error.sha256, error.bytes, time.time(),
                                            staged.reasons))
            return manifest

        self.store.commit(change, "a shard")

    def commit_shards(self, tables: list[pa.Table], threads: int = 1) -> None:
        """Several shards (ids contiguous from next_id) staged by `threads` threads, listed by one version."""
        from concurrent.futures import ThreadPoolExecutor

        base = self.manifest
        first = base.next_part(base.shards)
        meta = {b"pnsfw.space": json.dumps(self.store.space_info.__dict__).encode()}
        normal = [shards.normalize_rows(t, self.store.dim) for t in tables]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            staged = list(pool.map(lambda a: stage_table(self.store, "shards", first + a[0], a[1], meta),
                                   enumerate(normal)))
        pending = [_Pending(s, t) for s, t in zip(staged, normal)]

        def change(manifest: Manifest) -> Manifest:
            for item in pending:
                assert item.shard is not None and item.table is not None
                if int(item.table.column("id")[0].as_py()) != manifest.next_id:
                    item.table, item.shard = self._renumber(item.table, item.shard, manifest)
                self._append_shard(manifest, item.shard, item.table)
            return manifest

        self.store.commit(change, f"{len(tables)} shards")

    def _renumber(self, table: pa.Table, staged: Staged, manifest: Manifest) -> tuple[pa.Table, Staged]:
        log.info("another writer committed ids first; renumbering %s from id %d", staged.name, manifest.next_id)
        ids = shards.number_array(np.arange(manifest.next_id, manifest.next_id + table.num_rows), pa.int64())
        table = shards.normalize_rows(table.set_column(0, "id", ids), self.store.dim)
        meta = {b"pnsfw.space": json.dumps(self.store.space_info.__dict__).encode()}
        fresh = stage_table(self.store, "shards", manifest.next_part(manifest.shards), table, meta)
        self.store.fs.delete(f"shards/{staged.name}")
        return table, fresh

    @staticmethod
    def _append_shard(manifest: Manifest, staged: Staged, table: pa.Table) -> None:
        ids = table.column("id")
        first, last = int(ids[0].as_py()), int(ids[-1].as_py())
        manifest.shards.append(Shard(staged.name, staged.rows, first, last, staged.sha256, staged.bytes, time.time()))
        manifest.next_id = last + 1


def _reasons(errors: pa.Table | None) -> dict[str, int]:
    if errors is None or "reason" not in errors.column_names:
        return {}
    return dict(Counter(str(r) for r in errors.column("reason").to_pylist()))
