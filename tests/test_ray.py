"""`index --ray` on a real Ray cluster (ray start --head): rows, ids, embeddings and errors equal a local run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import index_folder, make_labelled_folder
from ray_cluster import Cluster, start_cluster
from test_store_s3 import _s3_url, s3  # noqa: F401  (the SeaweedFS fixture)

from pnsfw.store import Store

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    yield from start_cluster(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def ray_address(cluster: Cluster) -> str:
    return cluster.address


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_labelled_folder(tmp_path_factory.mktemp("corpus") / "data", per_class=16)
    (root / "sfw" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "nsfw" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tiny_checkpoint: Path) -> Path:
    store = tmp_path_factory.mktemp("local") / "store"
    index_folder(corpus, store, tiny_checkpoint, "--batch-size", "8")
    return store


def ray_index(corpus: Path, store: Path | str, ckpt: Path, address: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pnsfw.cli", "index", str(corpus), "--store", str(store), "--model", str(ckpt),
               "--device", "cpu", "--batch-size", "8", "--ray", address, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def assert_same_store(got: Path | str, want: Path | str) -> None:
    a, b = Store(got), Store(want)
    columns = ["id", "uri", "sha256", "width", "height"]
    assert a.table(columns).to_pylist() == b.table(columns).to_pylist()
    (ids_a, va), (ids_b, vb) = a.vectors(), b.vectors()
    assert ids_a.tolist() == ids_b.tolist()
    np.testing.assert_allclose(va.astype(np.float32), vb.astype(np.float32), atol=2e-3)
    def errors(store: Store) -> list[tuple]:
        return sorted(tuple(r.values()) for r in store.errors().select(["uri", "reason"]).to_pylist())

    assert errors(a) == errors(b)


def _wait(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_driver_killed_mid_run_then_rerun_equals_local(ray_address: str, corpus: Path, local_store: Path,
                                                       tiny_checkpoint: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = ray_index(corpus, store, tiny_checkpoint, ray_address, "--shard-size", "8", "--commit-every", "0s")
    _wait(lambda: store.exists() and Store(store).rows >= 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert Store(store).rows < 32  # it really died mid-run
    finished(ray_index(corpus, store, tiny_checkpoint, ray_address, "--shard-size", "8"))
    assert_same_store(store, local_store)


def test_lost_actor_is_retried_and_the_store_is_exact(cluster: Cluster, corpus: Path, tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    many = tmp_path / "many"
    shutil.copytree(corpus, many)
    store = tmp_path / "store"
    proc = ray_index(many, store, tiny_checkpoint, cluster.address, "--batch-size", "2")
    pids: list[int] = []
    _wait(lambda: bool(pids.extend(cluster.processes("Embedder")) or pids), proc)
    os.kill(pids[0], signal.SIGKILL)  # a lost worker: Ray restarts the actor and retries its unit
    assert proc.poll() is None
    out = finished(proc)
    assert "indexed 32 images" in out and "failed: 2" in out
    assert "Traceback" not in out and "execution finished" not in out
    want = tmp_path / "want"
    index_folder(many, want, tiny_checkpoint, "--batch-size", "8")
    assert_same_store(store, want)
    again = finished(ray_index(many, store, tiny_checkpoint, cluster.address))
    assert "indexed 0 images" in again and "already present: 34" in again


class _Dies:
    """An embedding actor whose process dies on every call (a unit that keeps killing its worker)."""

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        os._exit(1)


def test_a_unit_that_keeps_killing_its_actor_becomes_error_rows(ray_address: str, corpus: Path) -> None:
    import pickle

    import ray

    from pnsfw.distributed.cluster import RETRIES, actor_options
    from pnsfw.distributed.index import FAILED_UNIT, _embed_unit
    from pnsfw.indexer.sources import iter_items

    items = list(iter_items(str(corpus)))
    ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        actor = ray.remote(**actor_options(False, num_cpus=0))(_Dies).remote()
        row = _embed_unit({"unit": 0, "items": pickle.dumps(items)}, size=32, width=16, actors=[actor],
                          max_pixels=10**8, timeout=10, max_download=1 << 20)
    finally:
        ray.shutdown()
    results = pickle.loads(row["results"])
    failed = [r for r in results if r.reason == FAILED_UNIT]
    assert len(results) == 34 and len(failed) == 32 and row["features"] == b""  # + the 2 undecodable files
    assert all(r.stage == "embed" and f"died {RETRIES + 1} times" in r.detail for r in failed)


def test_units_are_cut_from_a_stream_one_window_at_a_time() -> None:
    from pnsfw.distributed.index import _windows
    from pnsfw.indexer.sources import Item

    pulled: list[int] = []

    def stream():
        for i in range(23):
            pulled.append(i)
            yield Item(f"/x/{i}.jpg", "/x")

    windows = _windows(stream(), 4, 3)
    first = next(windows)
    assert [[int(i.uri[3:-4]) for i in unit] for unit in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert len(pulled) == 12  # nothing beyond the window was listed yet
    rest = list(windows)
    assert [len(u) for w in rest for u in w] == [4, 4, 3]


def _scores(store: Path, name: str) -> dict[int, list[float]]:
    import pyarrow.parquet as pq

    table = pq.read_table(store / "scores" / name)
    probs = [c for c in table.column_names if c.startswith("p_")]
    return {row["id"]: [row[c] for c in probs] for row in table.to_pylist()}


def _trained_copies(store: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of STORE with the same trained model m: one scored locally, one left for Ray."""
    from pnsfw.classifier.scoring import score_store
    from pnsfw.classifier.train import TrainOptions, train_classifier

    trained = tmp_path / "trained"
    shutil.copytree(store, trained)
    train_classifier(trained, "folders", TrainOptions(epochs=2, name="m"))
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(trained, local)
    shutil.copytree(trained, on_ray)
    score_store(local, "m")
    return local, on_ray


def ray_score(store: Path, address: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pnsfw.cli", "score", "--store", str(store), "--model", "m", "--ray", address]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_same_scores(got: Path, want: Path, rows: int = 32) -> None:
    a, b = _scores(got, "m"), _scores(want, "m")
    assert sorted(a) == sorted(b) == list(range(rows))
    np.testing.assert_allclose([a[i] for i in b], [b[i] for i in b], atol=1e-5)


def test_lost_score_actor_is_retried_and_the_scores_are_exact(cluster: Cluster, corpus: Path,
                                                              tiny_checkpoint: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    index_folder(corpus, sharded, tiny_checkpoint, "--batch-size", "8", "--shard-size", "2")
    local, on_ray = _trained_copies(sharded, tmp_path)
    proc = ray_score(on_ray, cluster.address)
    pids: list[int] = []
    _wait(lambda: bool(pids.extend(cluster.processes("ShardScorer")) or pids), proc)
    os.kill(pids[0], signal.SIGKILL)  # Ray restarts the actor and retries its calls; the driver commits in order
    out = finished(proc)
    assert "on ray" in out and "scored 32 vectors in 16 shards" in out
    assert_same_scores(on_ray, local)
    again = finished(ray_score(on_ray, cluster.address))
    assert "scored 0 vectors" in again, again


@pytest.mark.usefixtures("s3")
def test_index_on_ray_into_an_s3_store(ray_address: str, corpus: Path, local_store: Path,
                                       tiny_checkpoint: Path) -> None:
    url = _s3_url("ray")
    out = finished(ray_index(corpus, url, tiny_checkpoint, ray_address))
    assert "indexed 32 images" in out
    assert_same_store(url, local_store)


def test_score_on_ray_of_a_damaged_shard_fails_with_the_local_line(ray_address: str, local_store: Path,
                                                                    tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pnsfw.cli import cli

    local, on_ray = _trained_copies(local_store, tmp_path)
    for store in (local, on_ray):
        shard = next((store / "shards").glob("part-*.parquet"))
        shard.write_bytes(shard.read_bytes()[:-100])
    shutil.rmtree(local / "scores")
    want = CliRunner().invoke(cli, ["score", "--store", str(local), "--model", "m"])
    assert want.exit_code == 1 and "shard" in want.output, want.output
    proc = ray_score(on_ray, ray_address)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert out.strip().splitlines()[-1] == want.output.strip().splitlines()[-1].replace(str(local), str(on_ray))
