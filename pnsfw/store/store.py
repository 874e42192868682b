"""The store: a folder or object-store prefix whose newest manifest version lists what is committed.

Read access is `Store`; appends go through `Store.writer()` (a StoreWriter). Every change is a function of
the manifest applied by `Store.commit`, which re-applies it on top of a racing writer's commit.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SpaceMismatch, StoreError
from . import hooks, shards
from .checkpoint import CHECKPOINT_DIR, document, read_manifest
from .fs import FileSystem, open_fs, read_text_or_none
from .log import VersionLog
from .lookup import IdMap, RowGroups, by_group
from .projection import Projection
from .records import Manifest, Shard, Space

if TYPE_CHECKING:
    from .artifacts import Scores
    from .writer import StoreWriter

log = logging.getLogger("pnsfw.store")
MANIFEST_DIR = "_manifest"
LEGACY_MANIFEST = "manifest.json"
NORM_TOLERANCE = 0.05  # fp16 unit vectors are within ~1e-3 of norm 1; flipped bits are far off
_HOST = blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def writer_token() -> str:
    """host-pid-random: unique per staged file, and tells the orphan sweep whose file it is."""
    return f"{_HOST}-{os.getpid()}-{os.urandom(2).hex()}"


class UriSet:
    """Membership of uris by their uint64 uri_hash (sorted, unique): what `index` checks new items against."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.unique(np.asarray(hashes, dtype="<u8"))

    @classmethod
    def adopt(cls, hashes: np.ndarray) -> UriSet:
        """Sort `hashes` (uint64) in place and keep it, deduplicated only when it holds duplicates: the peak is
        the array itself plus 1 byte a row, not the 3 copies of np.unique."""
        hashes.sort()
        if len(hashes) > 1 and bool((hashes[1:] == hashes[:-1]).any()):
            hashes = np.unique(hashes)
        out = cls.__new__(cls)
        out.hashes = hashes
        return out

    def __contains__(self, uri: object) -> bool:
        if not isinstance(uri, str) or not len(self.hashes):
            return False
        value = np.uint64(shards.uri_hash_one(uri))
        at = int(np.searchsorted(self.hashes, value))
        return at < len(self.hashes) and bool(self.hashes[at] == value)

    def __len__(self) -> int:
        return len(self.hashes)


class Store:
    """Read access to a store; `writer()` gives the write handle, `commit()` applies a change."""

    def __init__(self, root: str | Path, fs: FileSystem | None = None, load: bool = True):
        self.fs = fs or open_fs(root)
        self.root = str(root)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self.version, self.manifest, self.legacy = self._load() if load else (0, Manifest(), False)
        self._ids: tuple[Manifest, IdMap] | None = None
        self._names: tuple[Manifest, dict[str, Shard]] | None = None
        self.groups = RowGroups(self.fs, self.shard, self.damaged)

    # ---- reading the manifest
    def _load(self) -> tuple[int, Manifest, bool]:
        for attempt in range(3):
            latest = VersionLog(self.fs, MANIFEST_DIR).latest()
            if latest is None:
                break
            where = self.fs.url(f"{MANIFEST_DIR}/{latest[0]:010d}.json")
            try:
                return latest[0], read_manifest(self.fs, latest[1], where, self.root), False
            except FileNotFoundError:  # its checkpoint was swept after newer versions replaced it: re-list
                if attempt == 2:
                    raise StoreError(f"the checkpoint of {where} is missing; run `pnsfw repair --store {self.root}`"
                                     ) from None
        text = read_text_or_none(self.fs, LEGACY_MANIFEST)
        if text is not None:
            from .legacy import read_v1

            return 0, read_v1(self, text), True
        if any(e.name.endswith(".parquet") for e in self.fs.list("shards")):
            raise StoreError(f"store {self.root} has shards but no manifest; run `pnsfw repair --store {self.root}` "
                             "to rebuild it from the intact shards")
        return 0, Manifest(), False

    @classmethod
    def open(cls, root: str | Path) -> Store:
        """Open an existing store or fail with a clear message."""
        store = cls(root)
        if not store.exists:
            raise StoreError(f"no store at {store.root} (run `pnsfw index SOURCE --store {store.root}` first)")
        return store

    def refresh(self) -> bool:
        """Re-read the newest manifest; True when it changed."""
        version, manifest, legacy = self._load()
        changed = (version, legacy) != (self.version, self.legacy) or (legacy and manifest != self.manifest)
        self.version, self.manifest, self.legacy = version, manifest, legacy
        return changed

    def follow(self, interval: float = 1.0) -> bool:
        """Refresh when a newer version was committed, checking at most every `interval` seconds (long-lived
        readers such as `serve` call this per request); True when the manifest changed."""
        now = time.monotonic()
        if now - self._checked < interval:
            return False
        self._checked = now
        if self.latest_version() == self.version and not self.legacy:
            return False
        return self.refresh()

    def latest_version(self) -> int:
        """The newest committed version number (a cheap listing; 0 for none or a v1 store)."""
        versions = VersionLog(self.fs, MANIFEST_DIR).versions()
        return versions[-1] if versions else 0

    @property
    def exists(self) -> bool:
        return self.version > 0 or self.legacy

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def shards(self) -> list[Shard]:
        return self.manifest.shards

    @property
    def space_info(self) -> Space:
        if self.manifest.space is None:
            raise StoreError(f"store {self.root} has no vectors yet")
        return self.manifest.space

    @property
    def encoder(self) -> dict[str, Any] | None:
        return None if self.manifest.space is None else self.manifest.space.encoder

    @property
    def projection_info(self) -> dict[str, Any] | None:
        return None if self.manifest.space is None else self.manifest.space.projection

    @property
    def dim(self) -> int:
        return self.space_info.dim

    @property
    def space(self) -> str:
        """Fingerprint of the embedding space (encoder + projection)."""
        return self.space_info.fingerprint

    def check_space(self, fingerprint: str, what: str) -> None:
        if fingerprint != self.space:
            raise SpaceMismatch(f"{what} was built in embedding space {fingerprint}, but store {self.root} is in "
                                f"space {self.space} (another CLIP model or projection)")

    def projection(self) -> Projection:
        info = self.space_info.projection
        try:
            packed = np.load(io.BytesIO(self.fs.read_bytes("projection.npy")), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {self.fs.url('projection.npy')}: {exc}") from None
        projection = Projection.from_array(packed, str(info["kind"]))
        if projection.fingerprint != info["fingerprint"]:
            raise StoreError(f"{self.fs.url('projection.npy')} is not the projection the manifest records "
                             f"({projection.fingerprint} != {info['fingerprint']}); "
                             f"run `pnsfw repair --store {self.root}`")
        return projection

    # ---- reading shards
    def shard(self, name: str) -> Shard:
        if self._names is None or self._names[0] is not self.manifest:
            self._names = (self.manifest, {s.name: s for s in self.manifest.shards})
        found = self._names[1].get(name)
        if found is None:
            raise StoreError(f"shard {name} is not in store {self.root}")
        return found

    def shard_source(self, shard: Shard | str, check: bool = True) -> Any:
        """What pyarrow reads for a shard (a local path or a file object), after the cheap size check."""
        entry = self.shard(shard) if isinstance(shard, str) else shard
        if check:
            self.check_size(entry)
        return self.fs.open_input(f"shards/{entry.name}")

    def check_size(self, entry: Shard) -> None:
        """StoreError unless the shard file exists with the size the manifest records."""
        try:
            size = self.fs.size(f"shards/{entry.name}")
        except FileNotFoundError:
            raise self.damaged(entry.name, "is missing") from None
        if size != entry.bytes:
            raise self.damaged(entry.name, f"has {size} bytes, the manifest says {entry.bytes}")

    def damaged(self, name: str, what: str) -> StoreError:
        return StoreError(f"shard {name} of store {self.root} {what}; run `pnsfw repair --store {self.root}`")

    def _read(self, shard: Shard, columns: list[str] | None) -> pa.Table:
        if not self.fs.local and columns is not None:  # its footer (cached) and the chunks of these columns
            return pa.concat_tables([self.groups.read(shard.name, g, columns, cache=False)
                                     for g in range(self.groups.footer(shard.name)[0].num_row_groups)])
        try:
            return shards.read_table(self.shard_source(shard), columns)
        except (pa.ArrowException, OSError) as exc:
            raise self.damaged(shard.name, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None

    def read_shard(self, shard: Shard, columns: list[str]) -> pa.Table:
        """`columns` of a whole shard for a reader of most of it (bulk scoring): a local shard memory-mapped, a
        remote one fetched in one GET (its size checked against the manifest), then decoded from memory."""
        try:
            if self.fs.local:
                return shards.parquet_file(self.shard_source(shard)).read(columns, use_threads=False)
            data = self.fs.read_sized(f"shards/{shard.name}", shard.bytes)
            if len(data) != shard.bytes:
                raise self.damaged(shard.name, f"has {len(data)} bytes, the manifest says {shard.bytes}")
            return shards.parquet_file(pa.BufferReader(data)).read(columns, use_threads=False)
        except FileNotFoundError:
            raise self.damaged(shard.name, "is missing") from None
        except (pa.ArrowException, OSError) as exc:
            raise self.damaged(shard.name, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All committed rows (without the embedding unless asked); metadata columns where present."""
        wanted = shards.ITEM_COLUMNS if columns is None else columns
        tables = [self._read(s, self._present(s, wanted)) for s in self.manifest.shards]
        if not tables:
            return shards.shard_schema(1).empty_table().select([c for c in wanted if c in shards.FIXED_COLUMNS])
        return pa.concat_tables(tables, promote_options="default")

    def _present(self, shard: Shard, wanted: list[str]) -> list[str]:
        """The wanted columns this shard has (v1 shards lack uri_hash; metadata columns vary)."""
        if all(c in ("id", "uri", "source", "sha256", "width", "height", "embedding") for c in wanted):
            return wanted
        if not self.fs.local:
            return [c for c in wanted if c in self.groups.footer(shard.name)[0].schema.to_arrow_schema().names]
        try:
            names = set(shards.parquet_file(self.shard_source(shard)).schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise self.damaged(shard.name, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None
        return [c for c in wanted if c in names]

    def shard_columns(self) -> list[str]:
        """Column names of the newest shard (the fixed ones, then its metadata columns)."""
        if not self.manifest.shards:
            return []
        shard = self.manifest.shards[-1]
        if not self.fs.local:
            return list(self.groups.footer(shard.name)[0].schema.to_arrow_schema().names)
        try:
            return list(shards.parquet_file(self.shard_source(shard)).schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise self.damaged(shard.name, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None

    def errors(self) -> pa.Table:
        tables = []
        for part in self.manifest.errors:
            try:
                tables.append(shards.read_table(self.fs.open_input(f"errors/{part.name}")))
            except (pa.ArrowException, OSError) as exc:
                raise StoreError(f"error part {part.name} of store {self.root} cannot be read ({exc}); "
                                 f"run `pnsfw repair --store {self.root}`") from None
        return pa.concat_tables(tables) if tables else shards.ERROR_SCHEMA.empty_table()

    # ---- rows by id: one row group of one shard each (lookup.py)
    @property
    def ids(self) -> IdMap:
        """Ids <-> row positions of this manifest version, from its id ranges (no shard read)."""
        if self._ids is None or self._ids[0] is not self.manifest:
            self._ids = (self.manifest, IdMap(self.manifest.shards))
        return self._ids[1]

    def lookup(self, ids: Any, columns: list[str] | None = None, cache: bool = True) -> pa.Table:
        """The rows of `ids`, in that order, reading only the row groups that hold them; NotFound for an id
        the store lacks. `columns` None: every column but the embedding and uri_hash."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        shard, within = self.ids.require(ids, self.root)
        parts, order = [], []
        for name, group, positions, rows in by_group(self.ids.names, self.groups, shard, within):
            wanted = columns if columns is not None else self._item_columns(name)
            table = self.groups.read(name, group, wanted, cache)
            parts.append(table.take(pa.array(rows)))
            order.append(positions)
        if not parts:
            wanted = shards.ITEM_COLUMNS if columns is None else columns
            return shards.shard_schema(1).empty_table().select([c for c in wanted if c in shards.FIXED_COLUMNS])
        table = pa.concat_tables(parts, promote_options="default")
        return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    def uris_of(self, ids: Any) -> list[str]:
        """The uri of each id (cached row groups of the uri column: what search hits need, fast)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        shard, within = self.ids.require(ids, self.root)
        out: list[str] = [""] * len(ids)
        for name, group, positions, rows in by_group(self.ids.names, self.groups, shard, within):
            strings = self.groups.strings(name, group, "uri").take(rows)
            for at, uri in zip(positions.tolist(), strings):
                out[at] = uri
        return out

    def vectors_of(self, ids: Any) -> np.ndarray:
        """fp16 (n, dim) vectors of ids, in that order: each read by byte range from its page of the embedding
        column (RowGroups.values), or from its row group's embedding column where the pages do not allow it."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        shard, within = self.ids.require(ids, self.root)
        vectors = np.zeros((len(ids), self.dim), np.float16)
        for name, group, positions, rows in by_group(self.ids.names, self.groups, shard, within):
            raw = self.groups.values(name, group, "embedding", rows)
            if raw is None:
                table = self.groups.read(name, group, ["embedding"], cache=False).take(pa.array(rows))
                vectors[positions] = shards.embedding_matrix(table.column("embedding"), self.dim)
            else:
                vectors[positions] = raw.view("<f2").reshape(len(rows), self.dim)
        if not len(vectors):
            return np.zeros((0, self.dim), np.float16)
        norms = np.linalg.norm(vectors.astype(np.float32), axis=1)
        bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)
        if bad.any():
            name = self.ids.names[int(self.ids.locate(ids[bad][:1])[0][0])]
            raise self.damaged(name, f"holds vectors of norm {float(norms[bad][0]):.4g} (not unit vectors: "
                                     "flipped bits?)")
        return vectors

    def _item_columns(self, name: str) -> list[str]:
        meta, _ = self.groups.footer(name)
        return [c for c in meta.schema.to_arrow_schema().names if c not in ("embedding", "uri_hash")]

    def iter_vectors(self, selected: list[Shard] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids int64, vectors fp16 (n, dim)) one row group at a time; norms checked."""
        dim = self.dim
        for shard in self.manifest.shards if selected is None else selected:
            for batch in self._id_vector_batches(shard):
                ids, vectors = shards.number_values(batch.column(0)), shards.embedding_matrix(batch.column(1), dim)
                self._check_norms(shard, vectors)
                yield ids, vectors

    def _id_vector_batches(self, shard: Shard) -> Iterator[Any]:
        """A shard's (id, embedding) one row group at a time (remote: by ranged GETs, the footer cached)."""
        if not self.fs.local:
            for group in range(self.groups.footer(shard.name)[0].num_row_groups):
                yield from self.groups.read(shard.name, group, ["id", "embedding"], cache=False).to_batches()
            return
        try:
            yield from shards.iter_batches(self.shard_source(shard), ["id", "embedding"])
        except (pa.ArrowException, OSError) as exc:
            raise self.damaged(shard.name, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None

    def _check_norms(self, shard: Shard, vectors: np.ndarray) -> None:
        if not len(vectors):
            return
        sample = vectors[:: max(1, len(vectors) // 256)].astype(np.float32)
        norms = np.linalg.norm(sample, axis=1)
        bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)
        if bad.any():
            raise self.damaged(shard.name, f"holds vectors of norm {float(norms[bad][0]):.4g} (not unit vectors: "
                                           "flipped bits?)")

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors())
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float16)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def known_uris(self, errors: bool = True) -> UriSet:
        """Every uri already committed, as a row or (with `errors`) an error, so it is not tried again, as sorted
        uri hashes: 8 bytes a row, never a set of strings (format-1 shards without uri_hash are hashed on the fly)."""
        failed = np.zeros(0, "<u8")
        if errors:
            failed = shards.uri_hash(pc.drop_null(self.errors().column("uri")))
        hashes, at = np.empty(self.rows + len(failed), "<u8"), 0  # filled in place: 8 bytes a row at the peak
        for shard, values in zip(self.manifest.shards, self.fs.map(self._uri_hashes, self.manifest.shards)):
            if len(values) != shard.rows:
                raise self.damaged(shard.name, f"has {len(values)} rows, the manifest says {shard.rows}")
            hashes[at:at + len(values)] = values
            at += len(values)
        hashes[at:] = failed
        return UriSet.adopt(hashes)

    def _uri_hashes(self, shard: Shard) -> np.ndarray:
        column = "uri_hash" if "uri_hash" in self._present(shard, ["uri_hash"]) else "uri"
        values = self._read(shard, [column]).column(column)
        if column == "uri":
            return shards.uri_hash(values)
        return np.asarray(shards.number_values(values), dtype="<u8")

    # ---- artefacts (index generations, models, scores, labels): see artifacts.py
    def scores(self, name: str) -> Scores:
        from .artifacts import Scores

        return Scores(self, name)

    # ---- writing
    def commit(self, change: Callable[[Manifest], Manifest | None], what: str) -> Manifest:
        """Apply change(manifest copy) -> new manifest (None: nothing to do) as the next version.

        On a lost race the newest manifest is re-read and `change` applied again on top of it."""
        self.ensure_v2()
        result: dict[str, Any] = {}

        def read() -> tuple[int, Manifest]:
            self.refresh()
            if result.get("checkpoint"):  # ours lost the race: the winner's version does not reference it
                self.fs.delete(f"{CHECKPOINT_DIR}/{result.pop('checkpoint')}")
            return self.version, self.manifest

        def apply(manifest: Manifest) -> dict[str, Any] | None:
            new = change(manifest.copy())
            if new is None:
                return None
            data, result["checkpoint"] = document(self.fs, new, manifest, self.version + 1, writer_token())
            result["manifest"] = new
            return data

        version, _ = VersionLog(self.fs, MANIFEST_DIR).commit(read, apply, what)
        if "manifest" in result and version != self.version:
            self.version, self.manifest = version, result["manifest"]
        return self.manifest

    def ensure_v2(self) -> None:
        """Migrate a v1 store (manifest.json) to the versioned layout before its first write."""
        if self.legacy:
            from .legacy import migrate

            migrate(self)

    def write_json(self, rel: str, data: Any) -> None:
        self.fs.write_bytes(rel, (json.dumps(data, indent=1) + "\n").encode())

    @contextmanager
    def writer(self) -> Iterator[StoreWriter]:
        """The append handle. Locally an advisory lock keeps a second writer from duplicating work (an
        optimisation: correctness comes from the commit protocol); object stores have no lock."""
        from .lock import WriteLock
        from .maintenance import remove_orphans
        from .writer import StoreWriter

        lock: Any = nullcontext()
        if self.fs.local:
            try:
                Path(self.fs.local_path("")).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                from .fs import write_failure

                raise write_failure(self.root, exc) from None
            lock = WriteLock(self.fs.local_path(""))
        with lock:
            self.refresh()
            self.ensure_v2()
            remove_orphans(self)
            hooks.pause("writer:open")
            yield StoreWriter(self)

    def age(self) -> float:
        return time.time() - self.manifest.created
