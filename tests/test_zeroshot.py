"""Zero-shot concept models, raw CLIP inputs for projected models (predict .npy, ONNX --raw), raw-space stores."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import class_image, index_folder, make_labelled_folder

from pnsfw.classifier.model import load_classifier
from pnsfw.cli import cli
from pnsfw.store import Store

CONCEPTS = """# label: prompt
nsfw: a photo of a naked person
nsfw: explicit sexual content
sfw: a photo of a landscape
sfw: a cat sitting on a sofa
"""


def run_cli(*args: object, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def zs_store(tmp_path_factory: pytest.TempPathFactory, labelled_store: Path, tiny_checkpoint: Path) -> Path:
    root = tmp_path_factory.mktemp("zs")
    store = root / "store"
    shutil.copytree(labelled_store, store)
    (root / "concepts.txt").write_text(CONCEPTS)
    run_cli("train", "--store", store, "--zero-shot", root / "concepts.txt", "--name", "zs",
            "--clip-model", tiny_checkpoint, "--device", "cpu")
    return store


def test_zero_shot_is_the_documented_formula(zs_store: Path, tiny_checkpoint: Path) -> None:
    from pnsfw.indexer.embedding import EmbeddingService

    store = Store.open(zs_store)
    clf = load_classifier(store, "zs")
    assert clf.meta["kind"] == "zero-shot" and clf.classes == ["nsfw", "sfw"] and clf.binary
    texts = EmbeddingService.open(store, str(tiny_checkpoint), "cpu").embed_texts(
        [c["prompt"] for c in clf.meta["concepts"]])
    centroids = np.stack([texts[:2].mean(0), texts[2:].mean(0)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    _, x = store.vectors()
    logits = 100.0 * x.astype(np.float32) @ centroids.T
    expected = 1 / (1 + np.exp(-(logits[:, 0] - logits[:, 1])))
    np.testing.assert_allclose(clf.p_nsfw(x.astype(np.float32)), expected, atol=1e-5)


def test_zero_shot_scores_every_id_filters_predicts_explains_exports(zs_store: Path, tmp_path: Path) -> None:
    import onnxruntime
    import pyarrow.parquet as pq

    store = Store.open(zs_store)
    run_cli("score", "--store", zs_store, "--model", "zs")
    parts = sorted((zs_store / "scores" / "zs").glob("part-*.parquet"))
    scores = pq.read_table(parts).to_pandas()
    assert sorted(scores["id"]) == list(range(store.rows))
    run_cli("filter", "--store", zs_store, "--model", "zs", "--keep", "unsafe", "--threshold", "0", "--out",
            tmp_path / "all.parquet")
    assert pq.read_table(tmp_path / "all.parquet").num_rows == store.rows
    result = run_cli("explain", "--store", zs_store, "--model", "zs", "--id", "3", "--json")
    assert '"model": "zs"' in result.output
    run_cli("search", "--store", zs_store, "--id", "3", "--model", "zs", "-k", "3")
    out = tmp_path / "zs.onnx"
    run_cli("export", "--store", zs_store, "--model", "zs", "--out", out)
    _, x = store.vectors()
    (p,) = onnxruntime.InferenceSession(str(out)).run(["p_nsfw"], {"embedding": x.astype(np.float32)})
    np.testing.assert_allclose(p, scores.sort_values("id")["p_nsfw"], atol=1e-5)


def test_zero_shot_calibrated_on_labels(zs_store: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    (tmp_path / "c.txt").write_text(CONCEPTS)
    result = run_cli("train", "--store", zs_store, "--zero-shot", tmp_path / "c.txt", "--name", "zsc",
                     "--labels", "folders", "--threshold-for", "recall=0.9", "--clip-model", tiny_checkpoint,
                     "--device", "cpu")
    assert "calibrated on labels" in result.output
    meta = load_classifier(Store.open(zs_store), "zsc").meta
    assert meta["calibration"]["count"] == 80 and meta["metrics"]["labels"]["recall"] >= 0.9
    uncalibrated = load_classifier(Store.open(zs_store), "zs").meta
    assert (meta["scale"], meta["bias"]) != (uncalibrated["scale"], uncalibrated["bias"])


def test_zero_shot_bad_concepts(zs_store: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("nsfw a photo\n")
    result = run_cli("train", "--store", zs_store, "--zero-shot", tmp_path / "bad.txt", ok=False)
    assert result.exit_code == 1 and "bad.txt:1: expected `label: prompt`" in result.output
    (tmp_path / "one.txt").write_text("nsfw: a\nnsfw: b\n")
    result = run_cli("train", "--store", zs_store, "--zero-shot", tmp_path / "one.txt", ok=False)
    assert result.exit_code == 1 and "only one class" in result.output


def test_zero_shot_in_serve(zs_store: Path) -> None:
    from api_server import start_server

    (vector,) = Store.open(zs_store).vectors()[1][:1].astype(np.float32)
    clf = load_classifier(Store.open(zs_store), "zs")
    for server in start_server(zs_store, zs_store.parent / "serve.log", "--model", "zs"):
        with server.client() as client:
            body = client.post("/v1/score", json={"embedding": vector.tolist()}).json()
            assert body["model"] == "zs"
            assert body["p_nsfw"] == pytest.approx(float(clf.p_nsfw(vector[None])[0]), abs=1e-5)
            image = (zs_store.parent / "one.jpg")
            class_image("nsfw", 1).save(image)
            assert client.post("/v1/score", files={"image": image.read_bytes()}).status_code == 200


def test_predict_raw_npy_equals_image(labelled_store: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Raw CLIP features of an image, projected by predict, give the image's own verdict; ONNX --raw too."""
    import json

    import onnxruntime

    from pnsfw.indexer.decode import decode
    from pnsfw.indexer.encoder import load_encoder

    store_path = tmp_path / "store"
    shutil.copytree(labelled_store, store_path)
    run_cli("train", "--store", store_path, "--labels", "folders", "--epochs", "2")
    image = tmp_path / "x.jpg"
    class_image("nsfw", 7).save(image)
    encoder = load_encoder(str(tiny_checkpoint), "cpu")
    raw = encoder.encode_pixels(decode(image.read_bytes(), encoder.resolution).pixels[None])
    np.save(tmp_path / "raw.npy", raw)
    args = ("--store", store_path, "--clip-model", tiny_checkpoint, "--device", "cpu", "--json")
    from_image = json.loads(run_cli("predict", image, *args).output)[0]["verdict"]
    from_raw = json.loads(run_cli("predict", tmp_path / "raw.npy", *args).output)[0]["verdict"]
    assert from_raw["p_nsfw"] == pytest.approx(from_image["p_nsfw"], abs=1e-5)
    np.save(tmp_path / "odd.npy", np.ones((2, 100), np.float32))
    bad = run_cli("predict", tmp_path / "odd.npy", *args[:2], ok=False)
    assert bad.exit_code == 1 and "raw CLIP features" in bad.output

    out = tmp_path / "raw.onnx"
    run_cli("export", "--store", store_path, "--model", "default", "--raw", "--out", out)
    store = Store.open(store_path)
    raws = np.random.default_rng(0).standard_normal((20, store.projection().width)).astype(np.float32)
    (p,) = onnxruntime.InferenceSession(str(out)).run(["p_nsfw"], {"embedding": raws})
    expected = load_classifier(store, "default").p_nsfw(store.projection().apply(raws))
    np.testing.assert_allclose(p, expected, atol=1e-5)


def test_raw_space_store_from_images(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`index --projection none`: 512-d vectors that train, score, search and dedup like a projected store."""
    source = make_labelled_folder(tmp_path / "data", per_class=12)
    store_path = tmp_path / "store"
    index_folder(source, store_path, tiny_checkpoint, "--projection", "none")
    store = Store.open(store_path)
    assert store.dim == 512 and store.projection().kind == "none"
    _, x = store.vectors()
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=1), 1, atol=2e-3)
    run_cli("train", "--store", store_path, "--labels", "folders", "--epochs", "2", "--units", "16")
    run_cli("score", "--store", store_path)
    run_cli("search", "--store", store_path, "--text", "a photo", "--clip-model", tiny_checkpoint, "--device", "cpu")
    run_cli("dedup", "--store", store_path, "--out", tmp_path / "d.parquet")
    run_cli("export", "--store", store_path, "--raw", "--out", tmp_path / "r.onnx")
