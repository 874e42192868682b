#!/usr/bin/env python
"""CLI start-up: each command timed as a whole process, several runs, median (DESIGN §10, issue "One house").

Builds a tiny store (random tiny CLIP checkpoint, a few generated images, a trained model, scores present),
then times `pnsfw --help`, `score` with nothing to do, `search --id --model`, and `serve` until /health
answers. Also records which heavy modules each command imported.

    .venv/bin/python scripts/bench_startup.py --runs 5 --out docs/bench_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HEAVY = ("tensorflow", "keras", "torch", "faiss", "clip", "sklearn", "matplotlib")
TARGETS = {"help": 0.3, "score_noop": 1.5, "search_id_model": 2.0, "serve_ready": 4.0}
PROBE = f"""import runpy, sys, json, atexit
heavy = lambda: sorted(m for m in {HEAVY!r} if m in sys.modules)
atexit.register(lambda: print("HEAVY=" + json.dumps(heavy()), file=sys.stderr))
sys.argv = ["pnsfw"] + sys.argv[1:]
runpy.run_module("pnsfw.cli", run_name="__main__")
"""


def pnsfw(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "pnsfw.cli", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"pnsfw {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def build_store(root: Path) -> tuple[Path, str]:
    """A labelled folder of 2 x 24 images, indexed with a tiny checkpoint, a model trained and scored."""
    import torch
    from clip.model import CLIP

    torch.manual_seed(0)
    ckpt = root / "tiny.pt"
    torch.save(CLIP(embed_dim=512, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2,
                    transformer_layers=2).state_dict(), ckpt)
    rng = np.random.default_rng(0)
    for label, base in (("sfw", 200), ("nsfw", 40)):
        (root / "data" / label).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(base + rng.normal(0, 30, (48, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / label / f"{i:03d}.jpg")
    store = root / "store"
    pnsfw("index", str(root / "data"), "--store", str(store), "--model", str(ckpt), "--device", "cpu")
    pnsfw("train", "--store", str(store), "--labels", "folders", "--name", "m", "--epochs", "3")
    pnsfw("score", "--store", str(store), "--model", "m")
    return store, str(ckpt)


def timed(args: list[str]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pnsfw {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    heavy = [line for line in done.stderr.splitlines() if line.startswith("HEAVY=")]
    return seconds, json.loads(heavy[-1][6:]) if heavy else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_ready(store: Path) -> tuple[float, list[str]]:
    """Seconds from launch until GET /health answers 200."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pnsfw.cli", "serve", "--store", str(store), "--model", "m",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and time.perf_counter() - start < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start, []
            except OSError:
                time.sleep(0.02)
        raise SystemExit("serve did not answer /health within 60 s")
    finally:
        proc.terminate()
        proc.wait(10)


def measure(store: Path, runs: int) -> dict[str, Any]:
    commands = {
        "help": ["--help"],
        "score_noop": ["score", "--store", str(store), "--model", "m"],
        "search_id_model": ["search", "--store", str(store), "--id", "0", "--model", "m", "-k", "5"],
    }
    results: dict[str, Any] = {}
    for name, args in [*commands.items(), ("serve_ready", None)]:
        samples, heavy = [], []
        for _ in range(runs + 1):  # the first run warms the page cache and is not counted
            seconds, heavy = serve_ready(store) if args is None else timed(args)
            samples.append(seconds)
        counted = samples[1:]
        results[name] = {"median_s": statistics.median(counted), "min_s": min(counted), "max_s": max(counted),
                         "runs": counted, "target_s": TARGETS[name], "heavy_modules": heavy,
                         "met": statistics.median(counted) <= TARGETS[name]}
    return results


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "numpy", "pyarrow", "click", "fastapi", "tensorflow-cpu", "keras")
                if _installed(p)}
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = build_store(Path(tmp))
        results = measure(store, args.runs)
    print(f"{'command':<18} {'median s':>9} {'min':>7} {'max':>7} {'target':>7}  met  heavy modules imported")
    for name, r in results.items():
        print(f"{name:<18} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} {r['target_s']:7.1f}  "
              f"{'yes' if r['met'] else 'NO ':<4} {','.join(r['heavy_modules']) or '-'}")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
