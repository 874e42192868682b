"""Index generations as segments: an update writes a segment of the new shards only (the base neither read nor
rewritten), readers answer over base + segments as one index, crashes leave the last generation (real FAISS,
small synthetic stores)."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_store_s3 import local_or_s3, s3  # noqa: F401  (the SeaweedFS fixture)
from test_store_v2 import _new_store, _rows

from pnsfw.search import index as ix
from pnsfw.store import Store, artifacts, hooks
from pnsfw.store.maintenance import remove_orphans, repair_store, store_info, verify_store

ROOT = Path(__file__).resolve().parents[1]
IVFPQ = "IVF8,PQ16x4np|nprobe=4"
where = local_or_s3("where", "segments")


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    hooks.set_hook(None)


def _grow(root: Path, rows: int) -> None:
    store = Store.open(root)
    with store.writer() as writer:
        writer.commit(_rows(writer, rows), None)


def _build(root: Path, kind: str) -> dict[str, Any]:
    store = Store.open(root)
    with store.writer():
        return ix.build_index(store, kind)


def _update(root: Path) -> dict[str, Any]:
    store = Store.open(root)
    with store.writer():
        return ix.update_index(store)


def _meta(root: Path) -> dict[str, Any]:
    meta = artifacts.index_meta(Store.open(root))
    assert meta is not None
    return meta


def _files(root: Path) -> list[Path]:
    store = Store.open(root)
    return [artifacts.segment_path(store, e) for e in artifacts.index_files(store, _meta(root))]


def _digest(path: Path) -> tuple[str, int, float]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_ino, path.stat().st_mtime


def _queries(root: Path, n: int = 40) -> np.ndarray:
    return np.ascontiguousarray(Store.open(root).vectors()[1][::7][:n], dtype=np.float32)


def _segmented(tmp_path: Path, kind: str, updates: int = 3, base: int = 1200) -> Path:
    root = tmp_path / "s"
    _new_store(root, rows=base)
    _build(root, kind)
    for n in range(updates):
        _grow(root, 150 + 10 * n)
        _update(root)
    return root


def test_an_update_writes_a_segment_and_never_reads_or_rewrites_the_base(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _new_store(root, rows=1500)
    _build(root, IVFPQ)
    store = Store.open(root)
    base = artifacts.segment_path(store, artifacts.index_segments(store, _meta(root))[0])
    before = _digest(base)
    _grow(root, 200)
    aside = base.with_name("moved-away")
    base.rename(aside)  # an update that opened the base's rows would fail now
    try:
        summary = _update(root)
    finally:
        aside.rename(base)
    assert summary["added"] == 200 and summary["segments"] == 2 and not summary["rebuilt"]
    assert _digest(base) == before  # the base file: same bytes, same inode, not touched
    meta = _meta(root)
    segments = artifacts.index_segments(Store.open(root), meta)
    assert [s["rows"] for s in segments] == [1500, 200] and meta["ntotal"] == 1700
    assert segments[0]["folder"] == str(base.parent.relative_to(root))
    assert Store.open(root).manifest.index.uses == [segments[0]["folder"]]  # referenced, not copied
    new = artifacts.segment_path(Store.open(root), segments[1])
    trained = artifacts.segment_path(Store.open(root), artifacts.trained_part(Store.open(root), meta)).stat().st_size
    rows_bytes = (base.stat().st_size - trained) / 1500
    assert segments[1]["file"] == artifacts.LISTS_FILE and segments[1]["lists"]
    assert new.stat().st_size < 1.2 * 200 * rows_bytes  # the new rows' lists only: no quantizer, no codebooks
    assert not list(new.parent.glob("faiss.index"))
    assert verify_store(str(root)).ok


@pytest.mark.parametrize("merge", [True, False])
def test_flat_segments_answer_exactly_as_one_fresh_index(tmp_path: Path, merge: bool) -> None:
    root = _segmented(tmp_path, "flat")
    store = Store.open(root)
    loaded, meta = ix.load_index(store, merge=merge)
    assert len(meta["segments"]) > 1 and loaded.ntotal == store.rows == meta["ntotal"]
    assert type(loaded).__name__ == ("IndexIDMap" if merge else "IndexShards")
    fresh = ix.create_index(store, ix.make_plan("flat", store.rows, store.dim, 1 << 30))
    q = _queries(root)
    (got_d, got_i), (want_d, want_i) = loaded.search(q, 10), fresh.search(q, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


def test_ivf_segments_equal_one_index_of_the_same_training(tmp_path: Path) -> None:
    root = _segmented(tmp_path, IVFPQ)
    store = Store.open(root)
    meta = _meta(root)
    assert len(meta["segments"]) > 1 and meta.get("trained")
    one, _ = ix.empty_like(store, meta, artifacts.index_segments(store, meta)[0])
    ix.add_shards(one, store, [s.name for s in store.shards])
    ix.set_search_params(one, meta["search_params"])
    q = _queries(root)
    want = one.search(q, 10)[1]
    for merge in (True, False):  # merged inverted lists, or each segment searched and the top-k merged
        got = ix.load_index(store, merge=merge)[0].search(q, 10)[1]
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.99


def test_ivf_flat_segments_find_the_exact_neighbours(tmp_path: Path) -> None:
    root = _segmented(tmp_path, "IVF8,Flat|nprobe=8")
    store = Store.open(root)
    q = _queries(root)
    exact = ix.create_index(store, ix.make_plan("flat", store.rows, store.dim, 1 << 30)).search(q, 10)[1]
    got = ix.load_index(store)[0].search(q, 10)[1]
    np.testing.assert_array_equal(got, exact)


def test_hnsw_segments_are_searched_each_and_merged(tmp_path: Path) -> None:
    root = _segmented(tmp_path, "hnsw")
    store = Store.open(root)
    loaded = ix.load_index(store)[0]
    assert type(loaded).__name__ == "IndexShards" and loaded.ntotal == store.rows
    q = _queries(root)
    exact = ix.create_index(store, ix.make_plan("flat", store.rows, store.dim, 1 << 30)).search(q, 10)[1]
    got = loaded.search(q, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]) >= 0.95
    assert (got[:, 0] == exact[:, 0]).all()


def test_segments_merge_like_a_binary_counter_and_stay_few(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ix, "MAX_SEGMENTS", 4)
    root = tmp_path / "s"
    _new_store(root, rows=3000)
    _build(root, "flat")
    counts = []
    for n in range(12):
        _grow(root, 50 - n)  # each smaller than the last: no carry, only the cap merges
        counts.append(_update(root)["segments"])
    assert max(counts) <= 4 and 4 in counts
    meta = _meta(root)
    assert meta["segments"][0]["rows"] == 3000 and meta["ntotal"] == Store.open(root).rows
    assert sorted(meta["shards"]) == sorted(s.name for s in Store.open(root).shards)
    assert verify_store(str(root)).ok


def test_a_trained_kind_is_rebuilt_once_its_segments_outgrow_the_base(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _new_store(root, rows=1200)
    _build(root, IVFPQ)
    _grow(root, 500)
    assert not _update(root)["rebuilt"]
    _grow(root, 800)  # 1,300 rows after a base of 1,200
    summary = _update(root)
    assert summary["rebuilt"] and summary["segments"] == 1 and _meta(root)["ntotal"] == 2500


def test_reindex_builds_one_segment(tmp_path: Path) -> None:
    root = _segmented(tmp_path, "flat", updates=2)
    assert ix.reindex(root, "flat")["segments"] == 1
    meta = _meta(root)
    assert len(meta["segments"]) == 1 and meta["ntotal"] == Store.open(root).rows
    assert Store.open(root).manifest.index.uses == []


def test_an_exception_between_segment_write_and_commit_keeps_the_last_generation(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _new_store(root, rows=1200)
    _build(root, IVFPQ)
    _grow(root, 100)
    before = Store.open(root).manifest.index

    def boom(step: str) -> None:
        if step == "generation:index:published":
            raise RuntimeError("crash")

    hooks.set_hook(boom)
    with pytest.raises(RuntimeError, match="crash"):
        _update(root)
    hooks.set_hook(None)
    store = Store.open(root)
    assert store.manifest.index == before
    assert ix.load_index(store)[0].ntotal == 1200
    assert _update(root)["added"] == 100
    meta = _meta(root)
    assert meta["ntotal"] == 1300 and len(meta["shards"]) == len(set(meta["shards"])) == 2


KILLED = """
import sys, time
from pnsfw.store import Store, hooks
from pnsfw.search.index import update_index
def hook(step):
    if step == "generation:index:published":
        open(sys.argv[2], "w").write(step)
        time.sleep(600)
hooks.set_hook(hook)
store = Store.open(sys.argv[1])
with store.writer():
    update_index(store)
"""


def test_kill_9_between_segment_write_and_commit_then_rerun_adds_the_shard_once(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _new_store(root, rows=1200)
    _build(root, IVFPQ)
    _grow(root, 100)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(root), str(marker)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    store = Store.open(root)
    assert _meta(root)["ntotal"] == 1200 and ix.load_index(store)[0].ntotal == 1200
    current = root / Store.open(root).manifest.index.folder
    dead = [p for p in (root / "index").iterdir() if p != current]
    assert len(dead) == 1  # the dead writer's published folder, uncommitted
    assert _update(root)["added"] == 100
    remove_orphans(Store.open(root))
    assert not dead[0].exists() and current.exists()  # its writer is dead: swept; the base is referenced
    meta = _meta(root)
    assert meta["ntotal"] == 1300 and sorted(meta["shards"]) == sorted(s.name for s in Store.open(root).shards)
    assert all(p.exists() for p in _files(root)) and verify_store(str(root)).ok


def test_a_one_file_generation_loads_and_is_extended(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = _new_store(root, rows=1200)
    plan = ix.make_plan(IVFPQ, store.rows, store.dim, 1 << 30)
    old = ix.create_index(store, plan)
    with store.writer():
        ix.save_index(store, old, ix._meta(store, plan, IVFPQ, 1 << 30, old, [s.name for s in store.shards]), None)
    assert "segments" not in _meta(root)  # the format before segments
    q = _queries(root)
    want = old.search(q, 5)[1]
    np.testing.assert_array_equal(ix.load_index(Store.open(root))[0].search(q, 5)[1], want)
    base = root / Store.open(root).manifest.index.folder / "faiss.index"
    before = _digest(base)
    _grow(root, 100)
    assert _update(root)["segments"] == 2  # its trained part: the base with its inverted lists mapped, not read
    assert _digest(base) == before
    meta = _meta(root)
    assert meta["trained"]["file"] == "trained.faiss" and meta["segments"][0]["file"] == "faiss.index"
    aside = base.with_name("moved-away")
    base.rename(aside)
    try:
        _grow(root, 50)
        assert _update(root)["added"] == 50  # now from the trained part the first update kept
    finally:
        aside.rename(base)
    loaded = ix.load_index(Store.open(root))[0]
    assert loaded.ntotal == Store.open(root).rows == 1350
    np.testing.assert_array_equal(loaded.search(q, 5)[1][:, 0], want[:, 0])
    assert verify_store(str(root)).ok


def test_the_sweep_keeps_every_referenced_segment_and_drops_the_superseded(tmp_path: Path) -> None:
    root = _segmented(tmp_path, "flat", updates=4)
    for _ in range(4):  # push the superseded generations out of the manifests the sweep keeps
        _grow(root, 3)
    _update(root)
    for folder in (root / "index").iterdir():  # no live writer: everything past the grace period
        old = time.time() - 2 * 3600
        for path in [folder, *folder.iterdir()]:
            os.utime(path, (old, old))
    removed = remove_orphans(Store.open(root))
    assert any(r.startswith("index/") for r in removed)
    assert all(p.exists() for p in _files(root))
    assert ix.load_index(Store.open(root))[0].ntotal == Store.open(root).rows
    assert verify_store(str(root)).ok


def test_verify_names_a_missing_segment_and_repair_rebuilds(tmp_path: Path) -> None:
    root = _segmented(tmp_path, "flat", updates=2)
    missing = _files(root)[1]
    missing.unlink()
    report = verify_store(str(root))
    assert not report.ok and "is missing" in report.problems[0] and missing.name in report.problems[0]
    repaired = repair_store(str(root), rebuild_index=ix.build_index)
    assert repaired.index == "rebuilt"
    assert len(_meta(root)["segments"]) == 1 and verify_store(str(root)).ok
    assert ix.load_index(Store.open(root))[0].ntotal == Store.open(root).rows


def test_verify_names_a_truncated_segment(tmp_path: Path) -> None:
    root = _segmented(tmp_path, IVFPQ, updates=1)
    lists = _files(root)[1]
    assert lists.name == artifacts.LISTS_FILE
    lists.write_bytes(lists.read_bytes()[:-8])
    report = verify_store(str(root))
    assert not report.ok and "index.json says" in report.problems[0]


def test_serve_sees_a_new_segment_after_a_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from pnsfw.api import engine
    from pnsfw.api.app import create_app

    monkeypatch.setattr(engine, "FOLLOW_S", 0.2)
    root = tmp_path / "s"
    _new_store(root, rows=1200)
    _build(root, "flat")
    app = create_app(root, None, engine.Settings(device="cpu", token=None, preload=False, search="index"))
    with TestClient(app) as client:
        assert client.get("/v1/stats").json()["search"]["segments"] == 1
        _grow(root, 40)
        _update(root)
        new = Store.open(root).vectors()[1][-1].astype(np.float32)
        deadline = time.monotonic() + 20
        while client.get("/v1/stats").json()["search"].get("segments") != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/v1/stats").json()["search"]["segments"] == 2
        hits = client.post("/v1/search", json={"embedding": new.tolist(), "k": 3}).json()["hits"]
        assert hits[0]["id"] == 1239


def test_segments_on_a_local_folder_and_on_s3(where: str) -> None:
    _new_store(where, rows=1200)
    _build(where, IVFPQ)
    for n in range(2):
        _grow(where, 101 - n)  # each smaller than the last: no merge
        assert _update(where)["segments"] == 2 + n
    store = Store.open(where)
    meta = _meta(where)
    assert [s.get("lists", False) for s in meta["segments"]] == [False, True, True]
    assert len(store.manifest.index.uses) == 2 and store_info(where)["index"]["segments"] == 3
    one, _ = ix.empty_like(store, meta, artifacts.index_segments(store, meta)[0])
    ix.add_shards(one, store, [s.name for s in store.shards])
    ix.set_search_params(one, meta["search_params"])
    q = np.ascontiguousarray(store.vectors()[1][::9], dtype=np.float32)
    want = one.search(q, 5)[1]
    np.testing.assert_array_equal(np.sort(ix.load_index(store)[0].search(q, 5)[1], axis=1), np.sort(want, axis=1))
    remove_orphans(Store.open(where))
    assert verify_store(where).ok and ix.load_index(Store.open(where))[0].ntotal == 1401
