"""Measure bulk scoring speed: vectors/s from store shards to committed score parts.

Usage: python scripts/bench_score.py [--rows 2M] [--shard-rows 50k] [--engines numpy:fp32,torch:bf16] [--device cpu|cuda]
                                     [--units 256] [--layers 1] [--activation tanh] [--out bench_score.json]

Builds a store of N random unit vectors directly with StoreWriter (no CLIP),
trains a small model on 4k random labels through the real `train_classifier`,
then runs `score_store` from scratch for each engine (shards in the page cache)
and the in-memory forward pass alone. Prints a table and writes JSON (machine,
versions, figures). For the GPU: KERAS_BACKEND=torch ... --engines torch:fp32,torch:fp16 --device cuda.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pnsfw.store import Store  # noqa: E402
from pnsfw.store.shards import embedding_array  # noqa: E402
from pnsfw.store.sizes import parse_size  # noqa: E402


def make_store(root: Path, rows: int, shard_rows: int, dim: int = 256, seed: int = 0) -> Store:
    from pnsfw.indexer.projection import random_projection

    rng = np.random.default_rng(seed)
    encoder = {"name": "bench-random", "fingerprint": "bench-random-0", "resolution": 224, "width": 512}
    with Store(root).writer() as writer:
        writer.set_space(encoder, random_projection(512, dim, seed))
        for start in range(0, rows, shard_rows):
            n = min(shard_rows, rows - start)
            vectors = rng.standard_normal((n, dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            ids = writer.next_ids(n)
            table = pa.table({"id": ids, "uri": [f"bench/{i}.jpg" for i in ids], "source": ["bench"] * n,
                              "sha256": [""] * n, "width": pa.array(np.full(n, 224, np.int32)),
                              "height": pa.array(np.full(n, 224, np.int32)), "embedding": embedding_array(vectors)})
            writer.commit(table, None)
    return Store.open(root)


def train_model(store: Store, args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from pnsfw.classifier.train import TrainOptions, train_classifier

    rng = np.random.default_rng(1)
    labels = store.root / "bench-labels.parquet"
    pq.write_table(pa.table({"id": np.arange(4096), "label": rng.choice(["nsfw", "sfw"], 4096)}), labels)
    train_classifier(store.root, str(labels), TrainOptions(name="bench", epochs=2, units=args.units,
                                                           layers=args.layers, activation=args.activation))


def time_forward(store: Store, engine: str, device: str, precision: str, batch_rows: int) -> float:
    """Vectors/s of the forward pass alone on fp16 rows already in memory."""
    from pnsfw.classifier.model import load_classifier
    from pnsfw.classifier.scoring import make_engine

    _, run = make_engine(load_classifier(store, "bench"), engine, device, precision)
    x = store.vectors()[1][:max(batch_rows * 8, 1)]
    run(x[:batch_rows])
    started = time.perf_counter()
    for i in range(0, len(x), batch_rows):
        run(x[i:i + batch_rows])
    return len(x) / (time.perf_counter() - started)


def time_score(store: Store, engine: str, device: str, precision: str, batch_rows: int) -> dict[str, Any]:
    from pnsfw.classifier.scoring import score_store, scores_dir

    shutil.rmtree(scores_dir(store, "bench"), ignore_errors=True)
    started = time.perf_counter()
    summary = score_store(store.root, "bench", device=device, engine=engine, batch_rows=batch_rows,
                          precision=precision)
    return {"vectors": summary.scored, "loop_s": round(summary.seconds, 3),
            "vectors_per_s": round(summary.vectors_per_s), "wall_s_with_model_load": round(time.perf_counter() - started, 3)}


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
            "loadavg_1m_after": os.getloadavg()[0]}  # other processes on a shared machine depress the figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2M")
    parser.add_argument("--shard-rows", default="50k")
    parser.add_argument("--batch-rows", default="64k")
    parser.add_argument("--engines", default="numpy:fp32,torch:fp32,torch:bf16", help="ENGINE:PRECISION,...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--repeat", type=int, default=2, help="Score runs per engine; the best is reported.")
    parser.add_argument("--workdir", default=None, help="Where to build the store (default: a temp folder).")
    parser.add_argument("--out", default="bench_score.json")
    args = parser.parse_args()
    rows, shard_rows, batch_rows = (parse_size(v) for v in (args.rows, args.shard_rows, args.batch_rows))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pnsfw-bench-score-"))
    try:
        started = time.perf_counter()
        store = make_store(work / "store", rows, shard_rows)
        build_s = time.perf_counter() - started
        train_model(store, args)
        results = []
        for spec in args.engines.split(","):
            engine, _, precision = spec.partition(":")
            precision = precision or "fp32"
            runs = [time_score(store, engine, args.device, precision, batch_rows) for _ in range(args.repeat)]
            best = max(runs, key=lambda r: r["vectors_per_s"])
            forward_rate = time_forward(store, engine, args.device, precision, batch_rows)
            results.append({"engine": engine, "precision": precision, "device": args.device, **best,
                            "forward_only_vectors_per_s": round(forward_rate)})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "bench_score", "rows": rows, "shard_rows": shard_rows, "batch_rows": batch_rows,
              "model": {"units": args.units, "layers": args.layers, "activation": args.activation},
              "store_build_s": round(build_s, 2), "machine": machine(args.device), "results": results}
    print(f"{'engine':<7} {'prec':<5} {'device':<6} {'vectors':>10} {'score vec/s':>13} {'forward vec/s':>14} {'wall s':>7}")
    for r in results:
        print(f"{r['engine']:<7} {r['precision']:<5} {r['device']:<6} {r['vectors']:>10,} {r['vectors_per_s']:>13,} "
              f"{r['forward_only_vectors_per_s']:>14,} {r['wall_s_with_model_load']:>7}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
