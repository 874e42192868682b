"""Measure bulk scoring speed: vectors/s from store shards to committed score parts.

Usage: python scripts/bench_score.py [--rows 2M] [--shard-rows 50k] [--engines numpy:fp32,torch:bf16,null]
                                     [--device cpu|cuda] [--readers N] [--writers N] [--train auto|real|fit]
                                     [--units 256] [--layers 1] [--activation tanh] [--out bench_score.json]

Builds a store of N random fp16 vectors directly (shards written by threads, no CLIP), trains a small
model on 4k random labels (real: `train_classifier`, which needs scikit-learn and matplotlib; fit: Keras
`fit` + save only; auto: real when those are installed), then runs `score_store` from scratch for each
engine (shards in the page cache) and the forward pass alone on rows already in memory. `null` is an
engine that computes nothing (constant outputs, rows still staged as for CUDA): the pipeline's own
ceiling (reads, tables, Parquet writes, progress), which bounds what a GPU can reach on this CPU.
Prints a table with the stage breakdown (thread-seconds per stage) and writes JSON.
On a GPU: KERAS_BACKEND=torch python3 scripts/bench_score.py --device cuda --rows 20M --engines torch:fp16,torch:bf16
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pnsfw.classifier.engines import Engine, Waiter, copy_rows, stacked_shape
from pnsfw.store import Store
from pnsfw.store.sizes import parse_size


def random_fp16(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """Random bits with the exponent pinned: |x| in [1/32, 1/16), random sign, then rows scaled to unit norm like
    the vectors of a real store (values do not change the speed), cheaper than normal draws."""
    bits = rng.bit_generator.random_raw(-(-rows * dim // 4)).view(np.uint16)[:rows * dim]
    bits &= 0x83FF  # keep sign and mantissa
    bits |= 0x2800  # exponent 01010: 2^-5
    vectors = bits.view(np.float16).reshape(rows, dim)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float32))
    vectors *= (1.0 / norms)[:, None].astype(np.float16)  # unit rows: the store checks norms on reads
    return vectors


def shard_table(first_id: int, rows: int, dim: int, seed: int) -> pa.Table:
    import pyarrow.compute as pc

    from pnsfw.store.shards import ITEM_COLUMNS, embedding_array

    ids = pa.array(np.arange(first_id, first_id + rows, dtype=np.int64))
    constant = pa.repeat(pa.scalar("bench"), rows)
    size = pa.array(np.full(rows, 224, np.int32))
    vectors = random_fp16(np.random.default_rng(seed), rows, dim)
    columns = [ids, pc.binary_join_element_wise("bench/", pc.cast(ids, pa.string()), ".jpg", ""), constant,
               pa.repeat(pa.scalar(""), rows), size, size, embedding_array(vectors)]
    return pa.Table.from_arrays(columns, names=[*ITEM_COLUMNS, "embedding"])  # the store adds uri_hash


def make_store(root: Path, rows: int, shard_rows: int, dim: int = 256) -> Store:
    """Shards written in parallel by threads, then listed in the manifest in one commit."""
    from pnsfw.indexer.projection import random_projection

    encoder = {"name": "bench-random", "fingerprint": "bench-random-0", "resolution": 224, "width": 512}
    starts = range(0, rows, shard_rows)
    with Store(root).writer() as writer:
        writer.set_space(encoder, random_projection(512, dim, 0))
        tables = [shard_table(start, min(shard_rows, rows - start), dim, seed=n) for n, start in enumerate(starts)]
        writer.commit_shards(tables, threads=len(os.sched_getaffinity(0)))
    return Store.open(root)


def _random_labels(store: Store) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = np.arange(min(4096, store.rows))
    return ids, rng.choice(["nsfw", "sfw"], len(ids))


def train_real(store: Store, args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from pnsfw.classifier.train import TrainOptions, train_classifier

    ids, labels = _random_labels(store)
    path = Path(store.root) / "bench-labels.parquet"
    pq.write_table(pa.table({"id": ids, "label": labels}), path)
    train_classifier(store.root, str(path), TrainOptions(name="bench", epochs=2, units=args.units,
                                                         layers=args.layers, activation=args.activation))


def train_fit(store: Store, args: argparse.Namespace, name: str = "bench") -> None:
    """Keras fit on the current backend and save: no metrics, so no scikit-learn or matplotlib."""
    from pnsfw.classifier.keras_io import keras_layers
    from pnsfw.classifier.model import model_paths
    from pnsfw.classifier.train import TrainOptions, fit
    from pnsfw.classifier.weights import save_weights
    from pnsfw.store.artifacts import ModelStage

    ids, labels = _random_labels(store)
    x = np.concatenate([v for _, v in store.iter_vectors(store.shards[:1])])[:len(ids)].astype(np.float32)
    y = (labels == "nsfw").astype(np.float32)[:, None]
    options = TrainOptions(name=name, epochs=2, units=args.units, layers=args.layers, activation=args.activation)
    model, _ = fit({"train": (x, y), "val": (x[:512], y[:512])}, 1, options.hyper(), options)
    staged = ModelStage(store, name)
    paths = model_paths(staged.folder, name)
    model.save(paths["keras"])
    save_weights(paths["weights"], keras_layers(model))
    meta = {"name": name, "classes": ["nsfw", "sfw"], "nsfw_classes": ["nsfw"], "threshold": 0.5,
            "space": store.space, "dim": store.dim}
    paths["meta"].write_text(json.dumps(meta))
    staged.commit()


def train_model(store: Store, args: argparse.Namespace) -> str:
    import importlib.util

    mode = args.train
    if mode == "auto":
        real = all(importlib.util.find_spec(m) is not None for m in ("sklearn", "matplotlib"))
        mode = "real" if real else "fit"
    (train_real if mode == "real" else train_fit)(store, args)
    return mode


class NullEngine(Engine):
    """No forward: constant outputs. Rows are still copied into a staging buffer (per reader thread, reused)
    as the CUDA engine copies them into pinned memory, so the figure is the pipeline's ceiling around it."""

    def __init__(self, width: int):
        super().__init__("null", "fp32", width)
        self.local = threading.local()

    def prepare(self, vectors: "np.ndarray | list[np.ndarray]") -> Any:
        rows, dim = stacked_shape(vectors)
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self.local.buffer = np.empty((rows, dim), np.float16)
        copy_rows(vectors, buffer)
        return rows

    def submit(self, staged: Any) -> Waiter:
        out = np.full((staged, self.width), 0.5, np.float32)
        return lambda: out


def build_engine(store: Store, spec: str, args: argparse.Namespace, batch_rows: int) -> Engine:
    from pnsfw.classifier.engines import make_engine
    from pnsfw.classifier.model import load_classifier

    clf = load_classifier(store, "bench")
    engine, _, precision = spec.partition(":")
    if engine == "null":
        return NullEngine(clf.steps[-1].weight.shape[1])
    return make_engine(clf, engine, args.device, precision or "fp32", batch_rows)


def max_error(store: Store) -> float:
    """Largest |p_nsfw - the exact fp32 forward| over the first shard's part."""
    import pyarrow.parquet as pq

    from pnsfw.classifier.model import load_classifier
    from pnsfw.classifier.scoring import scores_of

    shard = store.shards[0]
    _, vectors = next(store.iter_vectors([shard]))
    p = pq.read_table(scores_of(store, "bench").part_source(shard.name), columns=["p_nsfw"]).column("p_nsfw").to_numpy()
    return float(np.abs(p[:len(vectors)] - load_classifier(store, "bench").p_nsfw(vectors)).max())


def time_score(store: Store, engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    from pnsfw.classifier.scoring import score_store, scores_of

    store.fs.delete(scores_of(store, "bench").folder)
    started = time.perf_counter()
    summary = score_store(store.root, "bench", engine=engine, readers=args.readers, writers=args.writers)
    return {"vectors": summary.scored, "loop_s": round(summary.seconds, 3),
            "vectors_per_s": round(summary.vectors_per_s),
            "wall_s_with_model_load": round(time.perf_counter() - started, 3), "stages": summary.stages}


def first_rows(store: Store, rows: int) -> np.ndarray:
    parts, total = [], 0
    for _, vectors in store.iter_vectors():
        parts.append(vectors)
        total += len(vectors)
        if total >= rows:
            break
    return np.concatenate(parts)[:rows]


def time_forward(engine: Engine, x: np.ndarray, shard_rows: int, min_s: float = 1.0) -> float:
    """Vectors/s of the engine alone (H2D + forward + D2H on a GPU) on rows already staged in memory,
    shard by shard and pipelined as score_store submits them."""
    staged = [engine.prepare(x[i:i + shard_rows]) for i in range(0, len(x), shard_rows)]
    engine.submit(staged[0])()
    done, started = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - started < min_s:
        waits = [engine.submit(s) for s in staged]
        for wait in waits:
            wait()
        done += len(x)
    return done / (time.perf_counter() - started)


def time_device_forward(engine: Engine, x: np.ndarray, min_s: float = 1.0) -> "float | None":
    """Vectors/s of the forward alone on rows already on the GPU (None off CUDA)."""
    from pnsfw.classifier.engines import CudaEngine

    if not isinstance(engine, CudaEngine):
        return None
    torch = engine.torch
    x_dev = torch.from_numpy(x).to(engine.device)
    torch.cuda.synchronize(engine.device)
    with torch.inference_mode(), torch.cuda.stream(engine.compute_stream):
        engine.forward(x_dev)
        engine.compute_stream.synchronize()
        done, started = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - started < min_s:
            engine.forward(x_dev)
            engine.compute_stream.synchronize()
            done += len(x)
    return done / (time.perf_counter() - started)


def bench_engine(store: Store, spec: str, args: argparse.Namespace, batch_rows: int, x: np.ndarray) -> dict[str, Any]:
    engine = build_engine(store, spec, args, batch_rows)
    runs = [time_score(store, engine, args) for _ in range(args.repeat)]
    best = max(runs, key=lambda r: r["vectors_per_s"])
    null = engine.name == "null"  # nothing to check or time in its forward
    error = None if null else round(max_error(store), 6)
    forward = None if null else round(time_forward(engine, x, parse_size(args.shard_rows)))
    device = time_device_forward(engine, x)
    return {"engine": engine.name, "precision": engine.precision, "device": args.device, **best,
            "forward_only_vectors_per_s": forward, "gpu_forward_vectors_per_s": device and round(device),
            "max_abs_error_vs_fp32": error, "all_runs_vectors_per_s": [r["vectors_per_s"] for r in runs]}


def machine(device: str) -> dict[str, Any]:
    import keras
    import pyarrow
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "keras": keras.__version__,
            "keras_backend": keras.backend.backend(), "pyarrow": pyarrow.__version__, "platform": platform.platform(),
            "tensorflow_imported": sys.modules.get("tensorflow") is not None,
            "loadavg_1m_after": os.getloadavg()[0]}  # other processes on a shared machine depress the figures


def _count(value: "int | None") -> str:
    return "-" if value is None else f"{value:,}"


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'engine':<6} {'prec':<5} {'vectors':>11} {'score vec/s':>12} {'fwd vec/s':>12} {'gpu fwd/s':>13} "
          f"{'read ts':>8} {'submit s':>8} {'wait ts':>8} {'write ts':>8} {'commit s':>8} {'main cpu':>8} "
          f"{'cpu s':>7} {'loop s':>7}")
    for r in results:
        s = r["stages"]
        print(f"{r['engine']:<6} {r['precision']:<5} {r['vectors']:>11,} {r['vectors_per_s']:>12,} "
              f"{_count(r['forward_only_vectors_per_s']):>12} {_count(r['gpu_forward_vectors_per_s']):>13} "
              f"{s['read_s']:>8.2f} "
              f"{s['submit_s']:>8.2f} {s['engine_wait_s']:>8.2f} {s['write_s']:>8.2f} {s['commit_s']:>8.2f} "
              f"{s['main_cpu_s']:>8.2f} {s['cpu_s']:>7.2f} {r['loop_s']:>7.2f}")
    print("ts: thread-seconds summed over the reader (read), writer (wait: outputs from the engine; write) threads")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2M")
    parser.add_argument("--shard-rows", default="50k", help="Rows per store shard (the indexer's default: 50k).")
    parser.add_argument("--batch-rows", default="64k", help="Rows per forward call inside a shard.")
    parser.add_argument("--engines", default="numpy:fp32,torch:fp32,torch:bf16,null", help="ENGINE:PRECISION,...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--readers", type=int, default=0, help="Reader threads (0: from the core count).")
    parser.add_argument("--writers", type=int, default=0, help="Writer threads (0: from the core count).")
    parser.add_argument("--train", default="auto", choices=["auto", "real", "fit"])
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--repeat", type=int, default=2, help="Score runs per engine; the best is reported.")
    parser.add_argument("--workdir", default=None, help="Where to build the store (default: a temp folder).")
    parser.add_argument("--out", default="bench_score.json")
    return parser.parse_args()


def main() -> None:
    from pnsfw.classifier.pipeline import PROGRESS_EVERY_PARTS, PROGRESS_EVERY_S, default_threads

    args = parse_args()
    rows, shard_rows, batch_rows = (parse_size(v) for v in (args.rows, args.shard_rows, args.batch_rows))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pnsfw-bench-score-"))
    try:
        started = time.perf_counter()
        store = make_store(work / "store", rows, shard_rows)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        train_mode = train_model(store, args)
        train_s = time.perf_counter() - started
        x = first_rows(store, min(rows, 1 << 20))
        results = [bench_engine(store, spec, args, batch_rows, x) for spec in args.engines.split(",")]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    readers, writers = default_threads()
    report = {"benchmark": "bench_score", "rows": rows, "shard_rows": shard_rows, "batch_rows": batch_rows,
              "readers": args.readers or readers, "writers": args.writers or writers,
              "progress_every": {"seconds": PROGRESS_EVERY_S, "parts": PROGRESS_EVERY_PARTS},
              "model": {"units": args.units, "layers": args.layers, "activation": args.activation},
              "train": train_mode, "train_s": round(train_s, 2), "store_build_s": round(build_s, 2),
              "machine": machine(args.device), "results": results}
    print_table(results)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"store build {build_s:.1f} s, train ({train_mode}) {train_s:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
