"""evaluate on the model's held-out rows, --threshold-for and what it reaches, the PNG reports, score's progress bar."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from terminal import on_a_terminal

from pnsfw.classifier import metrics as M
from pnsfw.classifier.labels import load_labels
from pnsfw.classifier.model import load_classifier, model_paths
from pnsfw.classifier.plots import PLOT_PIXELS
from pnsfw.cli import cli
from pnsfw.store import Store

FAST = ["--epochs", "15", "--batch-size", "16"]
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: object, ok: bool = True) -> "object":
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + result.stderr + repr(result.exception)
    return result


def write_labels(path: Path, labels: dict[int, str]) -> Path:
    path.write_text("id,label\n" + "".join(f"{i},{label}\n" for i, label in sorted(labels.items())))
    return path


@pytest.fixture(scope="module")
def partial(labelled_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    """A copy of labelled_store (40 sfw + 40 nsfw) with model `m` trained on 30 + 30 of them (by id) with
    --threshold-for precision=0.9; returns the store and the 20 labels the model never saw."""
    root = tmp_path_factory.mktemp("partial")
    store = root / "store"
    shutil.copytree(labelled_store, store)
    labels = load_labels(Store.open(store), "folders")
    seen = {i: label for label in ("sfw", "nsfw") for i in sorted(k for k, v in labels.items() if v == label)[:30]}
    run_cli("train", "--store", store, "--labels", write_labels(root / "train.csv", seen), "--name", "m",
            "--threshold-for", "precision=0.9", *FAST)
    return store, {i: label for i, label in labels.items() if i not in seen}


def recorded(store: Path, name: str) -> dict[int, str]:
    table = pq.read_table(model_paths(Store.open(store), name)["labels"]).to_pydict()
    return dict(zip(table["id"], table["split"]))


def test_evaluate_defaults_to_the_held_out_rows(partial: tuple[Path, dict[int, str]]) -> None:
    store, unseen = partial
    splits = recorded(store, "m")
    # 30 per class, --test-ratio 0.15: round(4.5) = 4 test rows per class (and as many for validation)
    assert sum(s == "test" for s in splits.values()) == 8 and sum(s == "val" for s in splits.values()) == 8
    result = run_cli("evaluate", "--store", store, "--model", "m", "--labels", "folders", "--json")
    out = json.loads(result.stdout)
    assert out["split"] == "test" and out["count"] == 8 + 20 == len(unseen) + 8
    assert out["rows_by_split"] == {"new": 20, "test": 8} and out["label_counts"] == {"nsfw": 14, "sfw": 14}
    assert out["label_mapping"] == {"nsfw": {"nsfw": True, "via": "class"}, "sfw": {"nsfw": False, "via": "class"}}
    # the confusion by hand: the model's p_nsfw on exactly those rows, at its stored threshold
    clf, s = load_classifier(Store.open(store), "m"), Store.open(store)
    labels = load_labels(s, "folders")
    held = sorted(i for i in labels if splits.get(i, "new") in ("test", "new"))
    ids, vectors = s.vectors()
    p = clf.p_nsfw(vectors[np.searchsorted(ids, held)])
    truth = np.array([labels[i] == "nsfw" for i in held])
    predicted = p >= clf.threshold
    assert out["confusion"] == {"tp": int((predicted & truth).sum()), "fp": int((predicted & ~truth).sum()),
                                "fn": int((~predicted & truth).sum()), "tn": int((~predicted & ~truth).sum())}
    assert result.stderr == ""
    text = run_cli("evaluate", "--store", store, "--model", "m", "--labels", "folders").stdout
    assert "model m, split test: 28 rows (new 20, test 8)" in text and "labels: nsfw 14, sfw 14" in text
    assert "nsfw -> NSFW" in text and "sfw -> safe" in text and "nan" not in text.lower()


def test_split_all_says_it_includes_training_rows(partial: tuple[Path, dict[int, str]]) -> None:
    store, _ = partial
    result = run_cli("evaluate", "--store", store, "--model", "m", "--labels", "folders", "--split", "all", "--json")
    out = json.loads(result.stdout)
    assert out["count"] == 80 and out["rows_by_split"] == {"new": 20, "test": 8, "train": 44, "val": 8}
    lines = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1 and "52 of the 80 rows were used to train" in lines[0] and "optimistic" in lines[0]


def test_empty_and_one_class_splits_warn(partial: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    store, _ = partial
    splits = recorded(store, "m")
    labels = load_labels(Store.open(store), "folders")
    trained_only = write_labels(tmp_path / "train.csv", {i: labels[i] for i, s in splits.items() if s == "train"})
    result = run_cli("evaluate", "--store", store, "--model", "m", "--labels", trained_only)
    assert result.exit_code == 0 and "0 rows" in result.stdout and "nan" not in result.stdout.lower()
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and "nothing to measure" in warning[0] and "--split all" in warning[0]
    nsfw = write_labels(tmp_path / "nsfw.csv", {i: "unsafe" for i, s in splits.items()
                                                if s == "test" and labels[i] == "nsfw"})
    result = run_cli("evaluate", "--store", store, "--model", "m", "--labels", nsfw, "--json")
    out = json.loads(result.stdout)
    assert out["count"] == 4 and out["pr_auc"] is None and out["roc_auc"] is None
    assert out["label_mapping"] == {"unsafe": {"nsfw": True, "via": "name"}}
    assert "only NSFW rows (4)" in result.stderr and "undefined" in result.stderr
    text = run_cli("evaluate", "--store", store, "--model", "m", "--labels", nsfw).stdout
    assert "unsafe -> NSFW (by name)" in text and "PR-AUC n/a" in text and "nan" not in text.lower()


def _png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    assert image.format == "PNG" and image.size == PLOT_PIXELS, (path, image.format, image.size)
    assert np.asarray(image.convert("L")).std() > 5  # something is drawn on it
    return image


def test_plots_are_pngs_of_the_expected_size(partial: tuple[Path, dict[int, str]], five_class_store: Path,
                                             tmp_path: Path) -> None:
    store, _ = partial
    meta = load_classifier(Store.open(store), "m").meta
    written = meta["metrics"]["test"]["plots"]
    assert sorted(Path(p).name for p in written) == ["confusion.png", "pr.png", "roc.png"]
    for path in written:
        _png(Path(path))
    result = run_cli("evaluate", "--store", store, "--model", "m", "--labels", "folders", "--plots",
                     tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["confusion.png", "pr.png", "roc.png"]
    assert f"plot: {tmp_path / 'report' / 'roc.png'}" in result.stdout
    for path in (tmp_path / "report").iterdir():
        _png(path)


def test_class_confusion_png_for_softmax(tmp_path: Path) -> None:
    from pnsfw.classifier.plots import save_plots

    y, p = np.array([1, 1, 0, 0, 0], bool), np.array([0.9, 0.4, 0.6, 0.2, 0.1], np.float32)
    classes = {"classes": ["a", "b", "c"], "matrix": [[2, 0, 0], [1, 1, 0], [0, 0, 1]]}
    written = save_plots(y, p, 0.5, tmp_path, "x-", classes)
    assert [Path(w).name for w in written] == ["x-pr.png", "x-roc.png", "x-confusion.png", "x-classes.png"]
    for path in written:
        _png(Path(path))
    assert [Path(w).name for w in save_plots(y[:2], p[:2], 0.5, tmp_path / "one")] == ["confusion.png"]


def test_threshold_for_reports_what_it_reaches(partial: tuple[Path, dict[int, str]]) -> None:
    store, _ = partial
    s = Store.open(store)
    clf = load_classifier(s, "m")
    choice = clf.meta["threshold_choice"]
    assert choice["rule"] == "precision" and choice["target"] == 0.9 and choice["on"] == "val"
    assert choice["rows"] == 8 and choice["threshold"] == clf.threshold
    splits, labels = recorded(store, "m"), load_labels(s, "folders")
    ids, vectors = s.vectors()
    for split, reached in (("val", choice["reached"]), ("test", choice["evaluated"])):
        rows = sorted(i for i, name in splits.items() if name == split)
        p = clf.p_nsfw(vectors[np.searchsorted(ids, rows)])
        truth, predicted = np.array([labels[i] == "nsfw" for i in rows]), p >= clf.threshold
        precision = (predicted & truth).sum() / predicted.sum() if predicted.any() else 1.0
        assert reached["precision"] == pytest.approx(precision)
        assert reached["recall"] == pytest.approx((predicted & truth).sum() / truth.sum())
    assert choice["met"] and choice["reached"]["precision"] >= 0.9 and choice["evaluated"]["split"] == "test"


def test_threshold_rules_by_hand() -> None:
    y, p = np.array([1, 0, 1, 0], bool), np.array([0.9, 0.95, 0.8, 0.1])
    # thresholds 0.1, 0.8, 0.9, 0.95 -> precision 2/4, 2/3, 1/2, 0/1 and recall 1, 1, 1/2, 0
    assert M.choose_threshold(y, p, ("precision", 0.6), "val")["threshold"] == 0.8
    assert M.choose_threshold(y, p, ("recall", 1.0), "val")["threshold"] == 0.8
    assert M.choose_threshold(y, p, ("recall", 0.5), "val")["threshold"] == 0.9
    missed = M.choose_threshold(y, p, ("precision", 0.9), "val")
    assert not missed["met"] and missed["threshold"] == 0.8 and missed["reached"]["precision"] == pytest.approx(2 / 3)
    assert "cannot be reached on the val split" in missed["note"] and "0.6667" in missed["note"]
    one = M.choose_threshold(np.ones(3, bool), np.array([0.2, 0.5, 0.9]), ("recall", 0.9), "val")
    assert not one["met"] and one["threshold"] == 0.5 and "one class only" in one["note"]
    assert M.choose_threshold(y, p, None, "val") | {"reached": None} == {
        "rule": None, "target": None, "on": "val", "rows": 4, "threshold": 0.5, "met": True, "reached": None,
        "note": ""}


def test_train_prints_the_threshold_it_picked(labelled_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(labelled_store, root)
    bad = run_cli("train", "--store", root, "--labels", "folders", "--threshold-for", "f1=0.9", ok=False)
    assert bad.exit_code == 1 and "--threshold-for 'f1=0.9'" in bad.stderr and "Epoch" not in bad.output
    result = run_cli("train", "--store", root, "--labels", "folders", "--threshold-for", "recall=0.9",
                     "--epochs", "3", "--batch-size", "16")
    line = [x for x in result.stdout.splitlines() if x.startswith("threshold ")]
    assert len(line) == 1 and "for recall=0.9, picked on val (12 rows)" in line[0] and "; on test (12 rows)" in line[0]


def test_score_progress_only_on_a_terminal(partial: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    store, _ = partial
    quiet = tmp_path / "quiet"
    shutil.copytree(store, quiet)
    result = run_cli("score", "--store", quiet, "--model", "m", "--json")  # CliRunner: stderr is no terminal
    assert result.stderr == "" and json.loads(result.stdout)["scored"] == 80
    loud = tmp_path / "loud"
    shutil.copytree(store, loud)
    code, shown = on_a_terminal("score", "--store", loud, "--model", "m")
    assert code == 0 and "score m: 100%" in shown and "80.0/80.0" in shown and "rows/s" in shown, shown


def test_abstentions_are_no_class(partial: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    """A reviewer's `unsure` (a declared --label-classes may offer it) is left out of train and evaluate."""
    store, unseen = partial
    root = tmp_path / "store"
    shutil.copytree(store, root)
    unsure = sorted(unseen)[:5]
    abstain = write_labels(tmp_path / "unsure.csv", {i: "unsure" for i in unsure})
    labels = f"folders+{abstain}"
    trained = run_cli("train", "--store", root, "--labels", labels, "--name", "u", "--json", *FAST)
    meta = json.loads(trained.stdout)
    assert meta["classes"] == ["nsfw", "sfw"] and meta["data"]["ignored"] == {"unsure": 5}
    assert meta["data"]["labels"] == 75 and "ignored 5 labels that are no class (unsure 5" in trained.stderr
    assert not set(unsure) & set(recorded(root, "u"))
    kept = run_cli("train", "--store", root, "--labels", labels, "--name", "all", "--ignore-labels", "", "--json",
                   *FAST)
    assert json.loads(kept.stdout)["classes"] == ["nsfw", "sfw", "unsure"] and "ignored" not in kept.stderr
    bad = run_cli("evaluate", "--store", root, "--model", "m", "--labels", abstain, ok=False)
    assert bad.exit_code == 1 and "every label in store" in bad.stderr and "--ignore-labels ''" in bad.stderr
    mixed = json.loads(run_cli("evaluate", "--store", root, "--model", "m", "--labels", labels, "--json").stdout)
    assert mixed["ignored"] == {"unsure": 5} and "unsure" not in mixed["label_counts"]
