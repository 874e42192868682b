"""Bookkeeping that scales: rows by id read one row group of one shard; local folders and S3 (SeaweedFS)."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from crash import race_writers
from test_store_s3 import local_or_s3, s3  # noqa: F401  (the SeaweedFS fixture)
from test_store_v2 import ENCODER, _rows, _snapshot, _v1_copy, run_cli

from pnsfw.errors import NotFound, StoreError
from pnsfw.indexer.projection import random_projection
from pnsfw.store import Store, StoreWriter, checkpoint, hooks, shards
from pnsfw.store.fs import FileSystem, open_fs
from pnsfw.store.records import Manifest


class CountingFile:
    """A read-only file object that records (offset, length) of every read."""

    def __init__(self, raw: Any, reads: list[tuple[int, int]]):
        self.raw, self.reads = raw, reads

    def read(self, n: int = -1) -> bytes:
        at = self.raw.tell()
        data = self.raw.read(n)
        self.reads.append((at, len(data)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)


class CountingFS:
    """The store's file system (every call passed through), recording the byte ranges read from each shard
    (through a file object, by ranges, or a footer's suffix) and every whole-file read."""

    def __init__(self, inner: FileSystem):
        self.inner, self.root, self.local = inner, inner.root, inner.local
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        self.files: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_ranges(self, rel: str) -> Any:
        source = self.inner.open_ranges(rel)
        raw = open(source, "rb") if isinstance(source, str) else source
        return CountingFile(raw, self.ranges.setdefault(rel, []))

    def read_bytes(self, rel: str) -> bytes:
        self.files.append(rel)
        return self.inner.read_bytes(rel)

    def read_ranges(self, rel: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.ranges.setdefault(rel, []).extend((a, b - a) for a, b in ranges)
        return list(self.inner.read_ranges(rel, ranges))

    def read_tail(self, rel: str, length: int) -> tuple[bytes, int]:
        data, size = self.inner.read_tail(rel, length)
        self.ranges.setdefault(rel, []).append((size - len(data), len(data)))
        return data, size


where = local_or_s3("where", "scale")


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(shards, "ROW_GROUP", 50)
    return 50


def _store(location: str, sizes: list[int]) -> Store:
    store = Store(location)
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        for i, n in enumerate(sizes):
            writer.commit(_rows(writer, n, f"s{i}-", caption=[f"c{i}-{j}" for j in range(n)]), None)
    return Store.open(location)


def _group_span(meta: pq.FileMetaData, group: int, skip: tuple[str, ...]) -> tuple[int, int, list[tuple[int, int]]]:
    """(start, end) of row group `group` and the byte ranges of its columns not in `skip`."""
    rg = meta.row_group(group)
    spans, wanted = [], []
    for c in range(rg.num_columns):
        col = rg.column(c)
        start = col.dictionary_page_offset or col.data_page_offset
        spans.append((start, start + col.total_compressed_size))
        if col.path_in_schema not in skip:
            wanted.append(spans[-1])
    return min(a for a, _ in spans), max(b for _, b in spans), wanted


def test_lookup_reads_one_row_group_of_one_shard(where: str, small_groups: int) -> None:
    _store(where, [200, 200, 120])
    fs = CountingFS(open_fs(where))
    store = Store(where, fs=fs)  # type: ignore[arg-type]
    table = store.lookup([260, 255])
    assert table.column("id").to_pylist() == [260, 255]
    assert table.column("uri").to_pylist() == ["s1-60", "s1-55"] and table.column("caption").to_pylist() == \
        ["c1-60", "c1-55"]
    assert "embedding" not in table.column_names and "uri_hash" not in table.column_names
    name = f"shards/{store.shards[1].name}"
    assert list(fs.ranges) == [name]  # no other shard was opened
    meta = pq.ParquetFile(open_fs(where).open_input(name)).metadata
    start, end, _ = _group_span(meta, 1, ())
    embedding = [span for span in _group_span(meta, 1, ())[2] if span not in _group_span(meta, 1, ("embedding",))[2]]
    size = open_fs(where).size(name)
    body = [(o, n) for o, n in fs.ranges[name] if n and o + n < size]  # pyarrow reads the last 64 KiB for the footer
    assert len(body) < len(fs.ranges[name])
    for offset, length in body:
        assert start <= offset and offset + length <= end, f"read {offset}+{length} outside row group 1"
        assert all(offset + length <= a or offset >= b for a, b in embedding), "read the embedding column"
    fs.ranges.clear()
    assert store.lookup([251]).column("uri").to_pylist() == ["s1-51"] and not fs.ranges  # cached group and footer


def test_lookup_uris_and_vectors_match_the_whole_table(where: str, small_groups: int) -> None:
    store = _store(where, [120, 7, 230])
    everything = store.table(["id", "uri", "caption"]).to_pylist()
    ids = np.random.default_rng(0).permutation(store.rows)[:40]
    assert store.lookup(ids, ["id", "uri", "caption"]).to_pylist() == [everything[i] for i in ids]
    assert store.uris_of(ids) == [everything[i]["uri"] for i in ids]
    all_ids, vectors = store.vectors()
    np.testing.assert_array_equal(store.vectors_of(ids), vectors[ids])
    assert store.ids.rows_of(ids).tolist() == ids.tolist() and store.ids.ids_of(ids).tolist() == ids.tolist()
    np.testing.assert_array_equal(store.ids.all_ids(), all_ids)
    assert store.lookup([], ["id"]).num_rows == 0
    with pytest.raises(NotFound, match="id 357 is not in store"):
        store.lookup([3, 357])
    with pytest.raises(NotFound, match="id -1"):
        store.uris_of([-1])


def test_searcher_hits_and_items_come_from_row_groups(tmp_path: Path, small_groups: int) -> None:
    from pnsfw.search.query import Searcher

    store = _store(str(tmp_path / "s"), [120, 130])
    searcher = Searcher.open(store, exact_device="cpu")
    item = searcher.item(171)
    assert item["uri"] == "s1-51" and item["caption"] == "c1-51" and item["id"] == 171
    hits = searcher.search_id(171, 3)
    assert hits[0].id == 171 and hits[0].uri == "s1-51"
    assert all(h.uri == store.uris_of([h.id])[0] for h in hits)
    with pytest.raises(NotFound):
        searcher.item(250)


# ---- manifest checkpoints: commits and opens that do not grow with the shard count
@pytest.fixture
def every_8(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 8)
    return 8


def _commit_each(where: str, count: int, prefix: str = "c", size: int = 2) -> None:
    """`count` commits of one small shard, each by its own writer (which also sweeps stale checkpoints)."""
    for i in range(count):
        with Store(where).writer() as writer:
            writer.commit(_rows(writer, size, f"{prefix}{i}-"), None)


def _checkpoint_files(where: str) -> list[str]:
    return [e.name for e in open_fs(where).list(checkpoint.CHECKPOINT_DIR)]


def test_open_after_many_commits_reads_one_version_and_one_checkpoint(where: str, every_8: int) -> None:
    _store(where, [3])
    _commit_each(where, 30)
    checkpoint._CACHE.clear()  # a fresh process
    fs = CountingFS(open_fs(where))
    store = Store(where, fs=fs)  # type: ignore[arg-type]
    assert store.rows == 63 and store.manifest.next_id == 63 and len(store.shards) == 31
    assert store.table(["id"]).column("id").to_pylist() == list(range(63))
    assert len(fs.files) == 2 and fs.files[1].startswith(checkpoint.CHECKPOINT_DIR), fs.files
    doc = json.loads(open_fs(where).read_bytes(fs.files[0]))
    assert doc["format"] == 3 and "shards" not in doc and len(doc["tail"]["shards"]) < every_8
    with pytest.raises(StoreError, match="no shard list"):  # what a reader older than checkpoints says
        Manifest.from_json(doc, "v")
    assert 1 <= len(_checkpoint_files(where)) <= 3  # the sweep keeps only what kept versions may reference
    fs.files.clear()
    assert Store(where, fs=fs).rows == 63 and len(fs.files) == 1  # type: ignore[arg-type]  # checkpoint cached


def test_a_store_written_without_checkpoints_opens_and_gets_one(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 10**9)  # as before: every version lists every shard
    _store(where, [2])
    _commit_each(where, 11)
    versions = sorted(e.name for e in open_fs(where).list("_manifest") if not e.is_dir)
    old = json.loads(open_fs(where).read_bytes(f"_manifest/{versions[-1]}"))
    assert old["format"] == 2 and len(old["shards"]) == 12 and not _checkpoint_files(where)
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 8)
    assert Store.open(where).rows == 24
    _commit_each(where, 1, "new")
    store = Store.open(where)
    assert store.rows == 26 and store.manifest.checkpoint is not None and len(_checkpoint_files(where)) == 1
    assert store.uris_of([24, 25]) == ["new0-0", "new0-1"]


def test_migrate_and_repair_write_a_checkpoint_once_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 3)  # the v1 store's 3 shards + 1 error part: "large"
    root = _v1_copy(tmp_path)
    before = _snapshot(root)
    for command in ("migrate", "repair"):
        result = run_cli(command, "--store", root)
        assert result.exit_code == 0, result.output
        checkpoint._CACHE.clear()
        store = Store.open(root)
        newest = sorted(e.name for e in open_fs(str(root)).list("_manifest") if not e.is_dir)[-1]
        doc = json.loads((root / "_manifest" / newest).read_text())
        assert doc["format"] == 3 and "shards" not in doc and store.manifest.checkpoint is not None
        assert _checkpoint_files(str(root)) == [store.manifest.checkpoint.file]
        after = _snapshot(root)
        assert after[0] == before[0] and np.array_equal(after[1], before[1])
        for entry in (root / "_manifest").iterdir():  # lose every version: repair rebuilds from the shards
            if entry.is_file():
                entry.unlink()


def test_racing_writers_across_a_checkpoint(where: str, every_8: int) -> None:
    _store(where, [2])
    _commit_each(where, 6)  # 7 shards: the next commit of either writer writes a checkpoint
    a, b = StoreWriter(Store(where)), StoreWriter(Store(where))
    rows_a, rows_b = _rows(a, 5, "a"), _rows(b, 3, "b")
    raced: list[str] = []

    def hook(step: str) -> None:
        if step == "commit:_manifest" and not raced:  # a has written its checkpoint; b commits first
            raced.append(step)
            b.commit(rows_b, None)

    hooks.set_hook(hook)
    try:
        a.commit(rows_a, None)
    finally:
        hooks.set_hook(None)
    store = Store.open(where)
    assert store.rows == 22 and store.table(["id"]).column("id").to_pylist() == list(range(22))
    assert store.uris_of([14, 16, 17, 21]) == ["b0", "b2", "a0", "a4"]
    assert store.manifest.checkpoint is not None
    assert _checkpoint_files(where) == [store.manifest.checkpoint.file]  # a's losing checkpoint is gone


def test_racing_processes_across_checkpoints(tmp_path: Path) -> None:
    _store(str(tmp_path / "s"), [1])
    race_writers(tmp_path / "s", "xy", 8, checkpoint_every=4)
    store = Store.open(tmp_path / "s")
    assert store.rows == 49 and store.table(["id"]).column("id").to_pylist() == list(range(49))
    assert len(set(store.table(["uri"]).column("uri").to_pylist())) == 49
    assert store.manifest.checkpoint is not None


def test_known_uris_are_sorted_unique_hashes_filled_in_place(tmp_path: Path) -> None:
    from pnsfw.store.store import UriSet

    store = _store(str(tmp_path / "s"), [30, 20])
    known = store.known_uris()
    assert len(known) == 50 and "s0-3" in known and "s1-19" in known and "s1-20" not in known
    assert (known.hashes[1:] > known.hashes[:-1]).all()
    hashes = np.array([5, 3, 5, 1], "<u8")
    assert UriSet.adopt(hashes).hashes.tolist() == [1, 3, 5]
    kept = np.array([9, 2, 7], "<u8")
    assert UriSet.adopt(kept).hashes is kept and kept.tolist() == [2, 7, 9]  # no copy without duplicates
