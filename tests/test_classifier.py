"""Classifier stage: labels, training (binary, 5-class, tuner), metrics, bulk scoring, filter, predict, export."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pnsfw.classifier.data import stratified_split
from pnsfw.classifier.labels import folder_label, load_labels, read_labels
from pnsfw.classifier.model import list_models, load_classifier, model_paths
from pnsfw.classifier.scoring import lookup_scores, score_store, scores_of
from pnsfw.cli import cli
from pnsfw.store import Projection, Store, artifacts

FAST = ["--epochs", "15", "--batch-size", "16"]


def run_cli(*args: str, ok: bool = True) -> "object":
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    return result


def sharded_copy(src: Path, dst: Path, rows: int, projection: "Projection | None" = None,
                 source_is_parent: bool = False) -> Path:
    """The same rows (and space, unless another projection is given) in shards of `rows`."""
    store = Store.open(src)
    table = store.table(["id", "uri", "source", "sha256", "width", "height", "embedding"])
    if source_is_parent:
        import pyarrow as pa

        parents = [os.path.dirname(u) for u in table.column("uri").to_pylist()]
        table = table.set_column(2, "source", pa.array(parents, pa.string()))
    with Store(dst).writer() as writer:
        writer.set_space(store.encoder, projection or store.projection())
        for start in range(0, table.num_rows, rows):
            writer.commit(table.slice(start, rows), None)
    return dst


@pytest.fixture(scope="module")
def trained(labelled_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of labelled_store with the binary model `default` trained through the CLI."""
    store = tmp_path_factory.mktemp("trained") / "store"
    shutil.copytree(labelled_store, store)
    run_cli("train", "--store", store, "--labels", "folders", *FAST)
    return store


@pytest.fixture(scope="module")
def five_trained(five_class_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("five") / "store"
    shutil.copytree(five_class_store, store)
    run_cli("train", "--store", store, "--labels", "folders", "--name", "five", "--activation", "gelu",
            "--nsfw-classes", "hentai,porn,sexy", *FAST)
    return store


def test_folder_labels_group_subfolders(labelled_store: Path) -> None:
    labels = load_labels(Store.open(labelled_store), "folders")
    assert len(labels) == 80 and sorted(set(labels.values())) == ["nsfw", "sfw"]
    assert sum(v == "nsfw" for v in labels.values()) == 40
    assert folder_label("/d/data.tar::nsfw/sub/1.jpg", "/d/data.tar") == "nsfw"
    assert folder_label("/d/src/sfw/a/b/1.jpg", "/d/src") == "sfw"
    assert folder_label("/d/src/1.jpg", "/d/src") is None


def test_label_file_by_uri_and_id(labelled_store: Path, tmp_path: Path) -> None:
    store = Store.open(labelled_store)
    table = store.table(["id", "uri"])
    uris, ids = table.column("uri").to_pylist(), table.column("id").to_pylist()
    csv = tmp_path / "labels.csv"
    csv.write_text("uri,label\n" + "".join(f"{u},{'a' if i % 2 else 'b'}\n" for i, u in enumerate(uris[:10]))
                   + "/nowhere/x.jpg,a\nmissing.jpg,b\n")
    result = read_labels(store, str(csv))
    assert len(result.labels) == 10 and result.unknown == ["/nowhere/x.jpg", "missing.jpg"]
    import pyarrow as pa

    pq.write_table(pa.table({"id": ids[:5], "label": ["x"] * 5}), tmp_path / "by_id.parquet")
    assert load_labels(store, str(tmp_path / "by_id.parquet")) == {i: "x" for i in ids[:5]}


def test_split_is_deterministic_and_stratified() -> None:
    labels = np.array(["a"] * 60 + ["b"] * 40, dtype=object)
    first, again = stratified_split(labels, 0.15, 0.15, 0), stratified_split(labels, 0.15, 0.15, 0)
    assert (first == again).all() and not (first == stratified_split(labels, 0.15, 0.15, 1)).all()
    for label, n in (("a", 60), ("b", 40)):
        rows = first[labels == label]
        assert (rows == "test").sum() == round(n * 0.15) and (rows == "val").sum() == round(n * 0.15)


def copy_models(src: Path, dst: Path) -> None:
    """Commit the models of store src into store dst (as generations of dst)."""
    source, target = Store.open(src), Store.open(dst)
    for name in artifacts.model_names(source):
        stage = artifacts.ModelStage(target, name)
        shutil.copytree(artifacts.model_folder(source, name), stage.folder, dirs_exist_ok=True)
        stage.commit()


def test_binary_model_saved_with_metrics(trained: Path) -> None:
    models = model_paths(Store.open(trained), "default")["keras"].parent
    meta = json.loads((models / "default.json").read_text())
    assert meta["classes"] == ["nsfw", "sfw"] and meta["nsfw_classes"] == ["nsfw"] and meta["output"] == "sigmoid"
    test = meta["metrics"]["test"]
    assert test["roc_auc"] >= 0.95 and test["pr_auc"] >= 0.95 and test["count"] == 12
    assert {"precision_at_recall_0.9", "f1", "confusion", "threshold_table"} <= set(test)
    assert all(Path(p).stat().st_size > 1000 for p in test["plots"])
    assert meta["space"] == Store.open(trained).space and list_models(Store.open(trained)) == ["default"]
    labels = pq.read_table(models / "default.labels.parquet").to_pandas()
    assert len(labels) == 80 and set(labels.split) == {"train", "val", "test"}
    assert str(labels.id.dtype) == "int64" and list(labels.columns) == ["id", "label", "split"]
    assert any((models / "default.logs").rglob("events.out.tfevents*"))


def test_numpy_forward_matches_keras(trained: Path, five_trained: Path) -> None:
    for root, name in ((trained, "default"), (five_trained, "five")):
        clf = load_classifier(Store.open(root), name)
        _, vectors = Store.open(root).vectors()
        x = vectors.astype(np.float32)
        expected = clf.keras_outputs(x)
        np.testing.assert_allclose(clf.outputs(vectors), expected, atol=1e-5)


def test_five_class_softmax(five_trained: Path) -> None:
    store = Store.open(five_trained)
    clf = load_classifier(store, "five")
    assert clf.classes == ["drawings", "hentai", "neutral", "porn", "sexy"] and not clf.binary
    assert clf.meta["metrics"]["test"]["roc_auc"] >= 0.95
    _, vectors = store.vectors()
    probs = clf.probabilities(vectors)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(clf.p_nsfw(vectors), probs[:, [1, 3, 4]].sum(axis=1), atol=1e-6)
    result = run_cli("evaluate", "--store", five_trained, "--model", "five", "--labels", "folders", "--json")
    assert json.loads(result.stdout)["class_confusion"]["classes"] == clf.classes


def _all_scores(root: Path) -> np.ndarray:
    scores = scores_of(Store.open(root), "default")
    return np.concatenate([pq.read_table(scores.part_source(n), columns=["id"]).column("id").to_numpy()
                           for n in scores.state().shards])


def test_score_resumes_and_covers_every_id_once(trained: Path, tmp_path: Path) -> None:
    root = sharded_copy(trained, tmp_path / "sharded", rows=25)  # 4 shards: 25, 25, 25, 5
    copy_models(trained, root)
    assert score_store(root, "default").shards_scored == 4
    store = Store.open(root)
    scores = scores_of(store, "default")
    Path(scores.part_source(store.shards[3].name)).unlink()  # a crash between the part and its progress, or a lost file
    scores.commit(lambda state: state.shards.pop(store.shards[2].name) and state)
    again = score_store(root, "default")
    assert (again.shards_scored, again.shards_present, again.scored) == (2, 2, 30)
    ids = _all_scores(root)
    assert sorted(ids.tolist()) == list(range(80))
    store = Store.open(root)
    all_ids, vectors = store.vectors()
    clf = load_classifier(store, "default")
    np.testing.assert_allclose(lookup_scores(store, "default", all_ids), clf.p_nsfw(vectors), atol=1e-6)
    assert np.isnan(lookup_scores(store, "default", np.array([10_000]))).all()
    assert score_store(root, "default").scored == 0
    bf16 = score_store(root, "default", precision="bf16")  # another precision: scored again, close to fp32
    assert bf16.rescored_all and bf16.engine == "torch"
    np.testing.assert_allclose(lookup_scores(store, "default", all_ids), clf.p_nsfw(vectors), atol=2e-2)
    run_cli("train", "--store", root, "--labels", "folders", "--epochs", "2")  # a new model file
    store = Store.open(root)  # a Store is a snapshot of one manifest version: read the new one
    assert np.isnan(lookup_scores(store, "default", all_ids)).all()  # stale scores are not served
    rescored = run_cli("score", "--store", root, "--readers", "1", "--writers", "3")
    assert "scored 80 vectors in 4 shards" in rescored.output and "model changed" in rescored.output
    assert sorted(_all_scores(root).tolist()) == list(range(80))


def test_filter_counts_match_scores(trained: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(trained, root)
    run_cli("filter", "--store", root, "--keep", "unsafe", "--threshold", "0.5", "--out", tmp_path / "unsafe.parquet")
    run_cli("filter", "--store", root, "--keep", "safe", "--threshold", "0.5", "--out", tmp_path / "safe.txt")
    unsafe = pq.read_table(tmp_path / "unsafe.parquet").to_pandas()
    safe = (tmp_path / "safe.txt").read_text().splitlines()
    store = Store.open(root)
    ids, _ = store.vectors()
    p = lookup_scores(store, "default", ids)
    assert len(unsafe) == int((p >= 0.5).sum()) and len(safe) == int((p < 0.5).sum()) and len(unsafe) + len(safe) == 80
    assert (unsafe.p_nsfw >= 0.5).all() and set(unsafe.uri).isdisjoint(safe)
    assert all("/nsfw/" in u for u in unsafe.uri)  # separable classes: the unsafe ones are the nsfw folder


def test_other_space_is_refused(trained: Path, tmp_path: Path) -> None:
    other = Projection(np.linalg.qr(np.random.default_rng(5).normal(size=(512, 256)))[0].astype(np.float32),
                       np.zeros(256, np.float32), "random")
    root = sharded_copy(trained, tmp_path / "other", rows=80, projection=other)
    copy_models(trained, root)
    result = run_cli("score", "--store", root, ok=False)
    assert result.exit_code == 1 and "embedding space" in result.stderr and "Traceback" not in result.stderr


def test_onnx_matches_keras(trained: Path, five_trained: Path, tmp_path: Path) -> None:
    import onnxruntime

    for root, name in ((trained, "default"), (five_trained, "five")):
        out = tmp_path / f"{name}.onnx"
        run_cli("export", "--store", root, "--model", name, "--format", "onnx", "--out", out)
        clf = load_classifier(Store.open(root), name)
        x = Store.open(root).vectors()[1].astype(np.float32)
        probs, p_nsfw = onnxruntime.InferenceSession(str(out)).run(["probabilities", "p_nsfw"], {"embedding": x})
        keras_out = clf.keras_outputs(x)
        np.testing.assert_allclose(probs, clf.to_probabilities(keras_out), atol=1e-5)
        np.testing.assert_allclose(p_nsfw, clf.to_p_nsfw(keras_out), atol=1e-5)


CROSS = """
import json, sys, numpy as np
from pnsfw.classifier.model import load_classifier
from pnsfw.classifier.train import TrainOptions, train_classifier
from pnsfw.store import Store
root, loaded, trained = sys.argv[1:4]  # one process for both: each start imports keras and its backend
x = Store.open(root).vectors()[1].astype(np.float32)
np.save(loaded, load_classifier(Store.open(root), "default").keras_outputs(x))
train_classifier(root, "folders", TrainOptions(name="other", epochs=3, batch_size=16))
np.save(trained, load_classifier(Store.open(root), "other").keras_outputs(x))
import keras; print(keras.backend.backend())
"""


def _other_backend(backend: str, *args: object) -> None:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", CROSS, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith(backend), done.stderr[-2000:]


def test_keras_file_loads_across_backends(trained: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(trained, root)
    store = Store.open(root)
    x = store.vectors()[1]
    # saved on tensorflow, run on torch; then one trained on torch, run here
    _other_backend("torch", root, tmp_path / "torch_out.npy", tmp_path / "trained_on_torch.npy")
    np.testing.assert_allclose(np.load(tmp_path / "torch_out.npy"), load_classifier(store, "default").outputs(x),
                               atol=1e-5)
    other = load_classifier(store, "other")
    assert other.meta["backend"] == "torch"
    np.testing.assert_allclose(other.keras_outputs(x),
                               np.load(tmp_path / "trained_on_torch.npy"), atol=1e-5)


def test_tuner_runs_trials(labelled_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(labelled_store, root)
    result = run_cli("train", "--store", root, "--labels", "folders", "--tune", "--max-trials", "2", "--epochs", "3",
                     "--json")
    meta = json.loads(result.stdout)
    assert meta["tuning"]["trials"] == 2 and meta["config"]["units"] == meta["tuning"]["best"]["units"]


def test_training_input_errors(labelled_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(labelled_store, root)
    uris = Store.open(root).table(["uri"]).column("uri").to_pylist()
    one = tmp_path / "one.csv"
    one.write_text("uri,label\n" + "".join(f"{u},sfw\n" for u in uris))
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("uri,label\n/x/1.jpg,sfw\n/x/2.jpg,nsfw\n")
    flat = sharded_copy(root, tmp_path / "flat", rows=80, source_is_parent=True)
    cases = [(["--labels", one], "only one class"), (["--labels", unknown], "no labels found"),
             (["--labels", tmp_path / "nope.csv"], "not a file"),
             (["--labels", "folders", "--store", flat], "no labels found")]
    for extra, message in cases:
        args = ["train", "--store", root, *map(str, extra)]
        result = run_cli(*args, ok=False)
        assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("uri,label\n" + "".join(f"{u},{'nsfw' if '/nsfw/' in u else 'sfw'}\n" for u in uris)
                     + "/gone/a.jpg,sfw\n/gone/b.jpg,nsfw\n")
    result = run_cli("train", "--store", root, "--labels", mixed, "--epochs", "2")
    assert "skipped 2 labels" in result.stderr and "/gone/a.jpg" in result.stderr
    missing = run_cli("score", "--store", root, "--model", "nope", ok=False)
    assert missing.exit_code == 1 and "no model 'nope'" in missing.stderr and "default" in missing.stderr


def test_predict_images_and_npy(trained: Path, tmp_path: Path, labelled_store: Path) -> None:
    store = Store.open(trained)
    table = store.table(["id", "uri"])
    image, image_id = table.column("uri")[0].as_py(), table.column("id")[0].as_py()
    ids, vectors = store.vectors()
    np.save(tmp_path / "v.npy", vectors[:3].astype(np.float32))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = run_cli("predict", image, tmp_path / "v.npy", tmp_path / "broken.jpg", "--store", trained,
                     "--device", "cpu", "--json")
    rows = json.loads(result.stdout)
    npy_rows = [f"{tmp_path / 'v.npy'}[{i}]" for i in range(3)]
    assert [r["path"] for r in rows] == [image, *npy_rows, str(tmp_path / "broken.jpg")]
    clf = load_classifier(store, "default")
    expected = clf.p_nsfw(vectors[:3])
    verdicts = [r["verdict"] for r in rows[:4]]
    assert np.allclose([v["p_nsfw"] for v in verdicts[1:4]], expected, atol=1e-6)
    assert abs(verdicts[0]["p_nsfw"] - clf.p_nsfw(vectors[ids == image_id])[0]) < 1e-2  # fp16 storage
    assert verdicts[0]["nsfw"] == (verdicts[0]["p_nsfw"] >= clf.threshold) and verdicts[0]["model"] == "default"
    assert "error" in rows[-1] and set(verdicts[0]["probabilities"]) == {"nsfw", "sfw"}
    text = run_cli("predict", tmp_path / "v.npy", "--store", trained)
    assert text.stdout.count("\n") == 3
