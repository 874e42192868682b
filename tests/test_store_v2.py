"""Store format 2: the commit protocol, racing writers, crash windows, damage, repair, v1 migration."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from crash import kill_inside, race_writers

from pnsfw.cli import cli
from pnsfw.errors import StoreError
from pnsfw.indexer.projection import random_projection
from pnsfw.store import Store, StoreWriter, artifacts, hooks
from pnsfw.store.shards import embedding_array, uri_hash

V1_STORE = Path(__file__).parent / "data" / "v1_store"
ENCODER = {"name": "test", "fingerprint": "f" * 64, "resolution": 32, "width": 512}
ROOT = Path(__file__).resolve().parents[1]


def _rows(writer: StoreWriter, n: int, prefix: str = "u", dim: int = 256, **extra: list) -> pa.Table:
    ids = writer.next_ids(n)
    vectors = np.random.default_rng(int(ids[0]) if n else 0).standard_normal((n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    return pa.table({"id": ids, "uri": [f"{prefix}{i}" for i in range(n)], "source": ["s"] * n,
                     "sha256": ["x"] * n, "width": pa.array([1] * n, pa.int32()),
                     "height": pa.array([1] * n, pa.int32()), "embedding": embedding_array(vectors), **extra})


def _new_store(root: Path, rows: int = 0) -> Store:
    store = Store(root)
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        if rows:
            writer.commit(_rows(writer, rows), None)
    return Store.open(root)


def run_cli(*args: object) -> "object":
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    hooks.set_hook(None)


# ---- the commit protocol
def test_versions_are_put_if_absent_and_readers_take_the_newest_readable(tmp_path: Path) -> None:
    store = _new_store(tmp_path / "s", rows=3)
    versions = sorted((tmp_path / "s" / "_manifest").iterdir())
    assert [p.name for p in versions] == ["0000000001.json", "0000000002.json"]
    assert not (tmp_path / "s" / "manifest.json").exists()
    (tmp_path / "s" / "_manifest" / "0000000003.json").write_text('{"format": 2, "shar')  # torn / damaged
    reopened = Store.open(tmp_path / "s")
    assert reopened.version == 2 and reopened.rows == 3 == store.rows
    for path in (tmp_path / "s" / "_manifest").iterdir():
        path.write_text("null")
    with pytest.raises(StoreError, match="pnsfw repair --store"):
        Store.open(tmp_path / "s")


def test_a_version_of_a_newer_format_is_refused_with_one_line_not_skipped(tmp_path: Path) -> None:
    """Not read as damaged (which would fall back to the version before it): a newer pnsfw wrote it."""
    _new_store(tmp_path / "s", rows=3)
    doc = json.loads((tmp_path / "s" / "_manifest" / "0000000002.json").read_text())
    (tmp_path / "s" / "_manifest" / "0000000003.json").write_text(json.dumps(dict(doc, format=99)))
    result = run_cli("info", "--store", tmp_path / "s")
    assert result.exit_code == 1 and "store format 99, written by a newer pnsfw" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_writer_that_loses_the_race_renumbers_and_commits_on_top(tmp_path: Path) -> None:
    _new_store(tmp_path / "s")
    a, b = StoreWriter(Store(tmp_path / "s")), StoreWriter(Store(tmp_path / "s"))
    rows_a, rows_b = _rows(a, 5, "a"), _rows(b, 3, "b")
    assert rows_a.column("id")[0].as_py() == rows_b.column("id")[0].as_py() == 0  # both think ids start at 0
    raced = []

    def hook(step: str) -> None:
        if step == "commit:_manifest" and not raced:  # b commits between a's read and a's put
            raced.append(step)
            b.commit(rows_b, None)

    hooks.set_hook(hook)
    a.commit(rows_a, None)
    hooks.set_hook(None)
    store = Store.open(tmp_path / "s")
    table = store.table().sort_by("id")
    assert table.column("id").to_pylist() == list(range(8))
    assert table.column("uri").to_pylist() == ["b0", "b1", "b2", "a0", "a1", "a2", "a3", "a4"]
    assert [(s.min_id, s.max_id) for s in store.shards] == [(0, 2), (3, 7)]
    assert store.manifest.next_id == 8
    listed = {s.name for s in store.shards}
    assert {p.name for p in (tmp_path / "s" / "shards").iterdir()} == listed  # a's first staged copy is gone


def test_racing_processes_append_everything(tmp_path: Path) -> None:
    _new_store(tmp_path / "s")
    race_writers(tmp_path / "s", "xyz", 6, timeout=120)
    store = Store.open(tmp_path / "s")
    table = store.table()
    assert store.rows == 54 and sorted(table.column("id").to_pylist()) == list(range(54))
    assert len(set(table.column("uri").to_pylist())) == 54
    ids = np.concatenate([store.table(["id"]).column("id").to_numpy()])
    assert len(np.unique(ids)) == 54


# ---- typed bookkeeping: metadata columns, uri_hash, labels, generations
def test_metadata_columns_and_uri_hash(tmp_path: Path) -> None:
    store = _new_store(tmp_path / "s")
    with store.writer() as writer:
        writer.commit(_rows(writer, 2, caption=["a cat", "a dog"], key=pa.array([7, 8])), None)
        writer.commit(_rows(writer, 1), None)
    store = Store.open(tmp_path / "s")
    table = store.table(["id", "uri", "caption", "key", "uri_hash"])
    assert table.column("caption").to_pylist() == ["a cat", "a dog", None]
    assert table.column("key").to_pylist() == ["7", "8", None]  # metadata columns are strings
    assert table.column("uri_hash").to_pylist() == uri_hash(["u0", "u1", "u0"]).tolist()
    assert uri_hash(["http://x/a.jpg"])[0] == int.from_bytes(__import__("hashlib").blake2b(
        b"http://x/a.jpg", digest_size=8).digest(), "little")


def test_labels_append_and_read(tmp_path: Path) -> None:
    store = _new_store(tmp_path / "s", rows=3)
    artifacts.append_labels(store, pa.table({"id": [0, 2], "label": ["nsfw", "sfw"], "source": ["cli"] * 2,
                                             "at": [1.0, 2.0]}))
    artifacts.append_labels(store, pa.table({"id": [0], "label": ["sfw"], "source": ["page"], "at": [3.0]}))
    labels = artifacts.read_labels(Store.open(tmp_path / "s"))
    assert labels.column("label").to_pylist() == ["nsfw", "sfw", "sfw"]
    assert len(list((tmp_path / "s" / "labels").glob("part-*.parquet"))) == 2


def test_model_files_commit_as_one_generation(tmp_path: Path) -> None:
    store = _new_store(tmp_path / "s", rows=3)
    for version in ("one", "two"):
        stage = artifacts.ModelStage(store, "m")
        (stage.folder / "m.keras").write_text(version)
        (stage.folder / "m.json").write_text(json.dumps({"v": version}))
        stage.commit()
    folder = artifacts.model_folder(Store.open(tmp_path / "s"), "m")
    assert (folder / "m.keras").read_text() == "two" and json.loads((folder / "m.json").read_text()) == {"v": "two"}
    stage = artifacts.ModelStage(store, "m")  # a train that dies before commit: the old generation stays
    (stage.folder / "m.keras").write_text("three")
    assert (artifacts.model_folder(Store.open(tmp_path / "s"), "m") / "m.keras").read_text() == "two"


# ---- v1 stores
def _v1_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(V1_STORE, tmp_path / "v1"))


def _snapshot(root: Path) -> tuple[list, np.ndarray]:
    store = Store.open(root)
    table = store.table().sort_by("id").to_pylist()
    ids, vectors = store.vectors()
    return table, vectors[np.argsort(ids)]


def test_v1_store_opens_searches_and_scores_as_is(tmp_path: Path) -> None:
    from pnsfw.classifier.scoring import lookup_scores
    from pnsfw.search.query import Searcher

    root = _v1_copy(tmp_path)
    store = Store.open(root)
    assert store.legacy and store.rows == 24 and store.dim == 64 and len(store.manifest.errors) == 1
    hits = run_cli("search", "--store", root, "--id", "5", "-k", "3", "--json")
    assert hits.exit_code == 0, hits.output
    assert json.loads(hits.output)[0]["id"] == 5 and Searcher.open(store).index.ntotal == 24
    assert lookup_scores(store, "default", np.arange(24)).shape == (24,)  # (stale: v1 scored with .keras only)
    assert (root / "manifest.json").exists() and not (root / "_manifest").exists()  # reading migrates nothing


def test_v1_store_migrates_with_the_same_ids_and_rows(tmp_path: Path) -> None:
    from pnsfw.classifier.scoring import lookup_scores

    root = _v1_copy(tmp_path)
    before = _snapshot(root)
    result = run_cli("migrate", "--store", root)
    assert result.exit_code == 0 and "migrated" in result.output
    assert not (root / "manifest.json").exists() and not (root / "models" / "default.keras").exists()
    assert not (root / "index" / "faiss.index").exists()
    assert not (root / "scores" / "default" / "progress.json").exists()
    store = Store.open(root)
    assert not store.legacy and store.manifest.format == 2 and store.version == 1
    after = _snapshot(root)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert run_cli("score", "--store", root).exit_code == 0
    assert np.isfinite(lookup_scores(Store.open(root), "default", np.arange(24))).all()
    info = json.loads(run_cli("info", "--store", root, "--json").output)
    assert info["rows"] == 24 and info["index"]["coverage"] == 1.0 and "default" in info["models"]
    assert info["scores"]["default"]["shards_scored"] == 3 and info["errors"]["rows"] == 1
    assert run_cli("migrate", "--store", root).output.strip().endswith("already is format 2")
    import pandas as pd

    frame = pd.read_parquet(root / "scores" / "default")
    assert len(frame) == 24 and {"id", "uri", "p_nsfw"} <= set(frame.columns)
    import duckdb

    assert duckdb.sql(f"SELECT count(*) FROM '{root}/scores/default/*.parquet'").fetchall()[0][0] == 24


def test_v1_first_write_migrates(tmp_path: Path) -> None:
    root = _v1_copy(tmp_path)
    with Store(root).writer() as writer:
        writer.commit(_rows(writer, 2, dim=64), None)
    store = Store.open(root)
    assert store.manifest.format == 2 and store.rows == 26 and store.table()["id"].to_pylist()[-2:] == [24, 25]


@pytest.mark.parametrize("damage", ["null", "[]", "{}", '{"format": 1}', "{not json"])
def test_a_damaged_v1_manifest_is_refused_and_loses_nothing(tmp_path: Path, damage: str, tiny_checkpoint) -> None:
    root = _v1_copy(tmp_path)
    (root / "manifest.json").write_text(damage)
    files = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = run_cli("index", tmp_path, "--store", root, "--model", tiny_checkpoint, "--device", "cpu")
    assert result.exit_code == 1 and "pnsfw repair --store" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.relative_to(root) for p in root.rglob("*") if p.name != "LOCK") == files


def test_missing_manifest_is_refused_then_repaired(tmp_path: Path) -> None:
    root = _v1_copy(tmp_path)
    before = _snapshot(root)
    (root / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest; run `pnsfw repair"):
        Store.open(root)
    result = run_cli("repair", "--store", root)
    assert result.exit_code == 0, result.output
    assert "repaired: 3 shards, 24 rows kept" in result.output and "index rebuilt" in result.output
    after = _snapshot(root)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])


# ---- damage, verify, repair
def _flip_embedding_bytes(path: Path) -> None:
    """Overwrite bytes inside the raw fp16 embedding values (sizes and footer stay as they were)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0)
    column = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "embedding")
    start = column.data_page_offset + column.total_compressed_size - 600
    data = bytearray(path.read_bytes())
    data[start:start + 60] = b"\x7b" * 60
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named_by_reads_and_verify_and_dropped_by_repair(tmp_path: Path) -> None:
    root = _v1_copy(tmp_path)
    run_cli("migrate", "--store", root)
    store = Store.open(root)
    bad = store.shards[1]
    _flip_embedding_bytes(root / "shards" / bad.name)
    with pytest.raises(StoreError, match=f"shard {bad.name} .*pnsfw repair"):
        Store.open(root).vectors()
    result = run_cli("verify", "--store", root)
    assert result.exit_code == 1 and bad.name in result.output and "Traceback" not in result.output
    assert run_cli("search", "--store", root, "--id", "0").exit_code == 0  # reads one row group of another shard
    searches = [run_cli("search", "--store", root, "--id", i) for i in range(bad.min_id, bad.max_id + 1)]
    failed = [r for r in searches if r.exit_code == 1]  # the ids whose vectors hold the flipped bytes
    assert failed and all(bad.name in r.output and "Traceback" not in r.output for r in failed)
    repaired = run_cli("repair", "--store", root)
    assert repaired.exit_code == 0 and f"dropped shard {bad.name}" in repaired.output
    store = Store.open(root)
    assert store.rows == 14 and bad.name not in {s.name for s in store.shards}
    assert run_cli("verify", "--store", root).exit_code == 0
    ok = run_cli("search", "--store", root, "--id", "0", "--json")
    assert ok.exit_code == 0, ok.output


def test_truncated_shard_fails_with_one_line(tmp_path: Path) -> None:
    root = _v1_copy(tmp_path)
    store = Store.open(root)
    path = root / "shards" / store.shards[0].name
    path.write_bytes(path.read_bytes()[:1000])
    result = run_cli("search", "--store", root, "--id", "3")
    assert result.exit_code == 1 and store.shards[0].name in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS])
def test_write_failures_are_one_line_and_leave_the_store_intact(tmp_path: Path, code: int) -> None:
    store = _new_store(tmp_path / "s", rows=4)

    def hook(step: str) -> None:
        if step.startswith("write:shards/"):
            raise OSError(code, os.strerror(code))

    hooks.set_hook(hook)
    with pytest.raises(StoreError, match=r"cannot write .*nothing was committed") as info:
        with store.writer() as writer:
            writer.commit(_rows(writer, 3), None)
    assert "\n" not in str(info.value)
    hooks.set_hook(None)
    reopened = Store.open(tmp_path / "s")
    assert reopened.rows == 4 and reopened.version == store.version
    assert [p.name for p in (tmp_path / "s" / "shards").iterdir()] == [reopened.shards[0].name]


def test_read_only_store_gives_one_line(tmp_path: Path, tiny_checkpoint) -> None:
    root = _v1_copy(tmp_path)
    if os.geteuid() == 0:
        def hook(step: str) -> None:
            if step.startswith("write:"):
                raise OSError(errno.EROFS, "Read-only file system")
        hooks.set_hook(hook)
    else:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    result = run_cli("migrate", "--store", root)
    hooks.set_hook(None)
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert Store.open(root).legacy and Store.open(root).rows == 24


# ---- kill -9 inside each commit window
def _index_args(source: Path, store: Path, ckpt: Path) -> list:
    return ["index", source, "--store", store, "--model", ckpt, "--device", "cpu", "--workers", "-1",
            "--batch-size", "4", "--shard-size", "4"]


@pytest.fixture(scope="module")
def crash_source(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, Path]:
    from conftest import make_labelled_folder

    root = tmp_path_factory.mktemp("crash")
    source = make_labelled_folder(root / "src", per_class=5)
    reference = root / "reference"
    assert run_cli(*_index_args(source, reference, tiny_checkpoint)).exit_code == 0
    return source, reference


@pytest.mark.parametrize("step,nth", [("write:shards/", 2), ("staged:shards", 2), ("commit:_manifest", 3),
                                      ("committed:_manifest", 3), ("generation:index:filled", 1),
                                      ("generation:index:published", 1)])
def test_kill_inside_each_index_window_then_rerun_equals_an_uninterrupted_run(
        crash_source: tuple[Path, Path], tiny_checkpoint: Path, tmp_path: Path, step: str, nth: int) -> None:
    source, reference = crash_source
    store = tmp_path / "store"
    kill_inside(step, nth, _index_args(source, store, tiny_checkpoint), tmp_path / "marker")
    if Store(store).exists:
        Store.open(store).table()  # whatever the moment, the store reads
    again = run_cli(*_index_args(source, store, tiny_checkpoint))
    assert again.exit_code == 0, again.output
    got, want = _snapshot(store), _snapshot(reference)
    assert [(r["id"], r["uri"]) for r in got[0]] == [(r["id"], r["uri"]) for r in want[0]]
    np.testing.assert_allclose(got[1], want[1], atol=2e-3)  # batches differ after a resume: fp16 rounding
    s = Store.open(store)
    meta = artifacts.index_meta(s)
    assert meta["ntotal"] == s.rows == 10 and sorted(meta["shards"]) == sorted(x.name for x in s.shards)
    assert {p.name for p in (store / "shards").iterdir()} == {x.name for x in s.shards}  # dead leftovers swept


@pytest.mark.parametrize("step", ["generation:index:filled", "generation:index:published", "commit:_manifest"])
def test_kill_inside_reindex_keeps_a_matching_index(crash_source: tuple[Path, Path], tmp_path: Path,
                                                    step: str) -> None:
    store = Path(shutil.copytree(crash_source[1], tmp_path / "store"))
    kill_inside(step, 1, ["reindex", "--store", store, "--kind", "hnsw"], tmp_path / "marker")
    s = Store.open(store)
    meta = artifacts.index_meta(s)
    assert meta["kind"] == "flat" and meta["ntotal"] == 10  # the old generation, whole
    assert run_cli("search", "--store", store, "--id", "1").exit_code == 0
    assert run_cli("reindex", "--store", store, "--kind", "hnsw").exit_code == 0
    assert artifacts.index_meta(Store.open(store))["kind"] == "hnsw"
    assert run_cli("search", "--store", store, "--id", "1").exit_code == 0


@pytest.mark.parametrize("step", ["migrate:copied", "committed:_manifest", "migrate:cleaned"])
def test_kill_inside_migration(tmp_path: Path, step: str) -> None:
    root = _v1_copy(tmp_path)
    before = _snapshot(root)
    kill_inside(step, 1, ["migrate", "--store", root], tmp_path / "marker")
    assert _snapshot(root)[0] == before[0]
    assert run_cli("migrate", "--store", root).exit_code == 0
    with Store(root).writer():
        pass
    store = Store.open(root)
    assert store.manifest.format == 2 and not (root / "manifest.json").exists()
    after = _snapshot(root)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert len(list((root / "models" / "default").iterdir())) == 1  # copies of the killed run swept
