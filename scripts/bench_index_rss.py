"""Peak RSS of an incremental `pnsfw index` (1,000 new files) into stores of growing size, per interpreter.

The same store and the same command under each Python named by `--python NAME=PATH` (e.g. one venv with the
CUDA build of torch, one with the CPU build), so the fixed part of the RSS that torch's own libraries hold is
measured apart from the store's bookkeeping. Stores are written by bench_store_scale's synthetic writer;
prints a table and writes JSON.

    python scripts/bench_index_rss.py --rows 1M,5M,20M \\
        --python cuda-build=.venv/bin/python --python cpu-build=/tmp/cpuvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_store_scale as scale

from pnsfw.store import Store
from pnsfw.store.sizes import parse_size


def peak(python: str, root: Path, images: Path, checkpoint: Path) -> dict[str, float]:
    """VmHWM, private and file-backed RSS at exit (MB) and seconds of one `pnsfw index --no-faiss`."""
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(scale.ROOT))
    done = subprocess.run([python, "-c", scale.HWM, "index", str(images), "--store", str(root), "--model",
                           str(checkpoint), "--device", "cpu", "--workers", "1", "--no-faiss"],
                          capture_output=True, text=True, env=env, check=True)
    kb = {line.split()[0]: int(line.split()[1]) for line in done.stderr.splitlines()
          if line.split()[:1] in (["VMHWM_KB"], ["RSSANON_KB"], ["RSSFILE_KB"])}
    return {"peak_rss_mb": round(kb["VMHWM_KB"] / 1024, 1), "anon_mb": round(kb["RSSANON_KB"] / 1024, 1),
            "file_mb": round(kb["RSSFILE_KB"] / 1024, 1), "seconds": round(time.perf_counter() - started, 1)}


def torch_version(python: str) -> str:
    done = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1M,5M,20M")
    parser.add_argument("--python", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--workdir", default="/tmp/pnsfw-bench-index-rss")
    parser.add_argument("--out", default=str(scale.ROOT / "docs" / "bench_index_rss.json"))
    args = parser.parse_args()
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.projection import random_projection

    pythons = dict(p.split("=", 1) for p in args.python) or {"this": sys.executable}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = scale.make_checkpoint("tiny", work / "tiny-clip.pt")
    encoder = load_encoder(str(checkpoint), "cpu", "fp32")
    space = (encoder.describe(), random_projection(encoder.width))
    results: dict[str, Any] = {}
    for n, rows in enumerate([0, *(parse_size(r) for r in args.rows.split(","))]):
        root = work / ("store" if rows else f"empty-{time.time_ns()}")
        if rows:
            scale.grow(root, rows, 50_000, space)
        results.setdefault(str(rows), {})["store_rows"] = Store(root).rows if rows else 0
        for i, (name, python) in enumerate(pythons.items()):
            images = scale.make_images(work / f"images-{rows}-{name}-{time.time_ns()}", scale.NEW_FILES, n * 10 + i)
            results[str(rows)][name] = peak(python, root, images, checkpoint)
            print(f"[bench] {rows:,} rows, {name}: {results[str(rows)][name]}", flush=True)
    target = {rows: round(16 * row["store_rows"] / 2**20 + 300) for rows, row in results.items()}  # MiB, as RSS
    print(f"{'rows':>12} " + " ".join(f"{name + ' MB':>16}" for name in pythons) + f" {'target MB':>10}")
    for rows, row in results.items():
        print(f"{row['store_rows']:>12,} " + " ".join(f"{row[n]['peak_rss_mb']:>16,.0f}" for n in pythons)
              + f" {target[rows]:>10,}")
    Path(args.out).write_text(json.dumps({"machine": scale.machine(), "new_files": scale.NEW_FILES,
                                          "torch": {n: torch_version(p) for n, p in pythons.items()},
                                          "target_mb": target, "sizes": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
