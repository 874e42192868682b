"""Commands that only read a classifier's weights never import TensorFlow or Keras (each run in a subprocess)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pnsfw.classifier.model import model_paths
from pnsfw.store import Store

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "torch")
# Runs `pnsfw ARGS...` like the console script, then reports which heavy modules the process imported.
RUN_CLI = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nIMPORTED=" + ",".join(m for m in HEAVY if m in sys.modules) + "\\n"))
from pnsfw.cli import main
sys.argv = ["pnsfw", *sys.argv[1:]]
main()
""".replace("HEAVY", repr(HEAVY))
# The API app in-process (create_app + its lifespan), one request per route, then the imported modules.
RUN_SERVE = """
import json, sys
from fastapi.testclient import TestClient
from pnsfw.api.app import create_app
from pnsfw.api.engine import Settings
app = create_app(sys.argv[1], None, Settings(device="cpu", token=None))
with TestClient(app) as client:
    codes = [client.post("/v1/score", json={"embedding": [0.1] * 256}).status_code,
             client.post("/v1/search", json={"id": 0, "k": 3}).status_code,
             client.post("/v1/explain", json={"id": 0, "k": 3}).status_code,
             client.get("/v1/items/0").status_code]
print(json.dumps({"codes": codes, "imported": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user has: no TensorFlow log setting of their own
    return env


def pnsfw(*args: object, ok: bool = True) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run([sys.executable, "-c", RUN_CLI, *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=REPO)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr[-3000:]
    line = [x for x in done.stderr.splitlines() if x.startswith("IMPORTED=")][-1]
    return done, set(filter(None, line[len("IMPORTED="):].split(",")))


@pytest.fixture(scope="module")
def model_store(labelled_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of labelled_store with model `default` trained through the CLI in a subprocess (no TF log env)."""
    store = tmp_path_factory.mktemp("weights") / "store"
    shutil.copytree(labelled_store, store)
    done, imported = pnsfw("train", "--store", store, "--labels", "folders", "--epochs", "3")
    assert "tensorflow" in imported or "keras" in imported  # training does use Keras ...
    noise = [x for x in done.stderr.splitlines() if "absl" in x or "oneDNN" in x or "cpu_feature_guard" in x]
    assert not noise, noise  # ... without TensorFlow's start-up lines reaching the user
    assert model_paths(Store(store), "default")["weights"].is_file()
    return store


def test_weight_readers_never_import_tensorflow(model_store: Path, tmp_path: Path) -> None:
    store = Store.open(model_store)
    uri = store.table(["uri"]).column("uri")[0].as_py()
    np.save(tmp_path / "v.npy", store.vectors()[1][:2].astype(np.float32))
    commands = [["score", "--store", model_store, "--device", "cpu"],
                ["score", "--store", model_store],  # nothing left to do
                ["filter", "--store", model_store, "--out", tmp_path / "safe.parquet"],
                ["predict", uri, tmp_path / "v.npy", "--store", model_store, "--device", "cpu", "--json"],
                ["search", "--store", model_store, "--id", "0", "--model", "default", "--json"],
                ["explain", "--store", model_store, "--model", "default", "--id", "0", "--json"],
                ["evaluate", "--store", model_store, "--labels", "folders", "--json"]]
    for command in commands:
        _, imported = pnsfw(*command)
        assert not {"tensorflow", "keras"} & imported, (command, imported)
    _, imported = pnsfw("score", "--store", model_store)
    assert "torch" not in imported  # nothing to score: not even torch is loaded


def test_serve_never_imports_tensorflow(model_store: Path) -> None:
    done = subprocess.run([sys.executable, "-c", RUN_SERVE, model_store], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["codes"] == [200, 200, 200, 200] and not {"tensorflow", "keras"} & set(result["imported"])


def test_wrong_arguments_fail_before_heavy_imports(model_store: Path, tmp_path: Path) -> None:
    cases = [(["score", "--store", model_store, "--model", "nope"], "no model 'nope'"),
             (["score", "--store", model_store, "--engine", "numpy", "--precision", "bf16"], "fp32 only"),
             (["filter", "--store", model_store, "--out", tmp_path / "x.xlsx"], "--out"),
             (["predict", tmp_path / "missing.jpg", "--store", model_store], "no such file"),
             (["search", "--store", model_store, "--id", "0", "-k", "0"], "Invalid value for '-k'"),
             (["search", "--store", model_store, "--id", str(2**70)], "Invalid value for '--id'"),
             (["explain", "--store", model_store, "--model", "nope", "--id", "0"], "no model 'nope'"),
             (["evaluate", "--store", model_store, "--labels", tmp_path / "none.csv"], "not a file")]
    for command, message in cases:
        done, imported = pnsfw(*command, ok=False)
        usage = message.startswith("Invalid value")  # click's own checks: exit 2
        assert done.returncode == (2 if usage else 1), done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not set(HEAVY) & imported, (command, imported)


def test_model_with_only_a_keras_file_is_converted_once(model_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(model_store, root)
    weights = model_paths(Store(root), "default")["weights"]
    expected = np.load(weights)["0.gamma"]
    weights.unlink()  # a model saved by an older pnsfw
    done, imported = pnsfw("score", "--store", root, "--device", "cpu")
    assert "keras" in imported and "wrote default.weights.npz once" in done.stderr
    np.testing.assert_array_equal(np.load(weights)["0.gamma"], expected)
    _, imported = pnsfw("search", "--store", root, "--id", "1", "--model", "default")
    assert not {"tensorflow", "keras"} & imported


def test_weights_and_description_must_agree(model_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(model_store, root)
    meta_path = model_paths(Store(root), "default")["meta"]
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, classes=["a", "b", "c"], nsfw_classes=["a"])))
    done, _ = pnsfw("score", "--store", root, ok=False)
    assert "1 outputs" in done.stderr and "a, b, c" in done.stderr and "Traceback" not in done.stderr
    model_paths(Store(root), "default")["weights"].write_bytes(b"not a zip")
    done, _ = pnsfw("score", "--store", root, ok=False)
    assert "cannot read model weights" in done.stderr and "Traceback" not in done.stderr
