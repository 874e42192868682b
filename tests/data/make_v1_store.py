"""Builds tests/data/v1_store with the format-1 code of commit 460c754 (run once; the output is checked in).

    git archive 460c754 | tar -x -C /tmp/v1code
    PYTHONPATH=/tmp/v1code python tests/data/make_v1_store.py /tmp/v1gen tests/data/v1_store

Images: 2 classes x 12 generated pictures; a tiny random CLIP; a 512 -> 64 projection file (small files);
the store then holds 3 shards, an error part, a flat FAISS index, a trained model `default` and its scores.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_checkpoint, make_labelled_folder

from pnsfw.cli import cli


def main(work: Path, out: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = build_checkpoint(work / "tiny.pt")
    data = make_labelled_folder(work / "dataset", per_class=12)
    (data / "sfw" / "broken.jpg").write_bytes(b"not a jpeg")
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(512, 64)))
    np.save(work / "proj.npy", q.astype(np.float32))
    store = work / "store"
    for args in (["index", str(data), "--store", str(store), "--model", str(ckpt), "--device", "cpu",
                  "--workers", "-1", "--shard-size", "10", "--projection", str(work / "proj.npy")],
                 ["train", "--store", str(store), "--labels", "folders", "--epochs", "3", "--batch-size", "8"],
                 ["score", "--store", str(store)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(store, out, ignore=shutil.ignore_patterns("*.logs", "LOCK"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
