#!/usr/bin/env python
"""The Ray path against the local path on the same machine and the same files (DESIGN §10: overhead <= 15 %).

Index: the same thumbnail corpus (scripts/bench_index.py's generator) with the same full-size random
ViT-B/32 checkpoint, once locally and once with `--ray ADDRESS` on a local cluster started by this script
(`ray start --head`), runs interleaved (local, ray, local, ray, ...). Ray's own start-up is outside the
figures: the cluster is up, and one throw-away driver has joined it, before the runs (both timed, under
"cluster"); a new local Ray (`--ray` alone) would add its start-up once per job. Score: the same for
`pnsfw score --json` on a synthetic store when `--score-rows` > 0: e2e is the whole process (for Ray: its
`import ray`, ray.init, actor start-up and shutdown included), job is score_store's run of the shards.

    .venv/bin/python scripts/bench_ray.py --thumbs 2000 --runs 2 --out docs/bench_ray.json
    .venv/bin/python scripts/bench_ray.py --thumbs 0 --score-rows 5000000 --out docs/bench_ray_score.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent / "tests"))

from bench_index import cpu_info, ensure_checkpoint, ensure_corpus  # noqa: E402
from bench_score import make_store, train_fit  # noqa: E402
from ray_cluster import start_cluster  # noqa: E402


def index_once(corpus: Path, store: Path, ckpt: Path, extra: list[str]) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    summary = store.with_suffix(".summary.json")
    command = [sys.executable, "-m", "pnsfw.cli", "index", str(corpus), "--store", str(store), "--model", str(ckpt),
               "--device", "cpu", "--no-faiss", "--summary-json", str(summary), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    data = json.loads(summary.read_text())
    return {"e2e_s": wall, "images": data["indexed"], "e2e_img_s": data["indexed"] / wall,
            "steady_img_s": data["steady_images_per_s"]}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {"runs": runs, "e2e_img_s": median("e2e_img_s"), "steady_img_s": median("steady_img_s")}


def bench_index(args: argparse.Namespace, address: str, work: Path) -> dict[str, Any]:
    corpus, meta = ensure_corpus(args.workdir, "thumbs", args.thumbs, args.seed)
    ckpt = ensure_checkpoint(args.workdir, args.seed, Path(sys.executable).parent)
    local, ray = [], []
    for _ in range(args.runs):
        local.append(index_once(corpus, work / "local", ckpt, []))
        ray.append(index_once(corpus, work / "ray", ckpt, ["--ray", address, *args.ray_extra.split()]))
    result = {"corpus": meta, "local": compare(local), "ray": compare(ray)}
    for key in ("e2e_img_s", "steady_img_s"):
        result[f"overhead_{key}"] = 1 - result["ray"][key] / result["local"][key]
    return result


SCORE_FIGURES = ("e2e_vec_s", "job_vec_s")


def score_once(store: Path, model: str, extra: list[str]) -> dict[str, Any]:
    """`pnsfw score --json` of a model that has no scores yet (each run gets its own model: a full rescore).
    e2e: the whole process (imports, `ray.init`, Ray's workers starting); job: score_store's run of the shards
    (on Ray: from the first shard handed to Ray Data to the last part committed, ray.init excluded)."""
    command = [sys.executable, "-m", "pnsfw.cli", "score", "--store", str(store), "--model", model, "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    try:
        summary = json.loads(done.stdout)
    except ValueError:
        summary = {}
    if done.returncode != 0 or not summary.get("scored"):
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    scored, job = int(summary["scored"]), float(summary["seconds"])
    return {"e2e_s": wall, "vectors": scored, "e2e_vec_s": scored / wall, "job_s": job, "job_vec_s": scored / job,
            "engine": summary["engine"], "stages": summary["stages"]}


def bench_score(args: argparse.Namespace, address: str, work: Path) -> dict[str, Any]:
    """The same store scored by fresh models, locally and on Ray, interleaved."""
    store = make_store(work / "score-store", args.score_rows, args.shard_rows)
    train = argparse.Namespace(units=256, layers=1, activation="tanh")
    local, ray = [], []
    for run in range(args.runs):
        for path, extra, runs in (("local", [], local), ("ray", ["--ray", address], ray)):
            name = f"bench-{path}-{run}"
            train_fit(store, train, name)
            runs.append(score_once(Path(store.root), name, extra))
    figures = {path: {"runs": runs, **{key: statistics.median(r[key] for r in runs) for key in SCORE_FIGURES}}
               for path, runs in (("local", local), ("ray", ray))}
    shutil.rmtree(work / "score-store", ignore_errors=True)
    return {"rows": args.score_rows, "shard_rows": args.shard_rows, **figures,
            **{f"overhead_{key}": 1 - figures["ray"][key] / figures["local"][key] for key in SCORE_FIGURES}}


def warm_up(address: str, start_s: float) -> dict[str, Any]:
    """The cluster's own start, kept out of every run: `ray start --head` until `ray status` answers, then one
    throw-away driver (the first `ray.init` on a new cluster took 1-4 s here, later ones 0.05-0.6 s)."""
    code = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, address], check=True, capture_output=True)
    return {"start_s": round(start_s, 2), "first_driver_s": round(time.perf_counter() - started, 2),
            "note": "not in any figure below: each run joins this running cluster; a run's e2e includes its own "
                    "`import ray`, ray.init, actor start-up and shutdown; job: score_store's run of the shards"}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'path':<8} {'e2e img/s':>10} {'steady img/s':>13}")
    for path in ("local", "ray"):
        print(f"{path:<8} {result[path]['e2e_img_s']:10.1f} {result[path]['steady_img_s']:13.1f}")
    print(f"Ray overhead: e2e {result['overhead_e2e_img_s']:+.1%}, steady {result['overhead_steady_img_s']:+.1%} "
          "(target <= 15 %)")


def print_score_table(result: dict[str, Any]) -> None:
    print(f"{'score':<8} {'e2e vectors/s':>14} {'job vectors/s':>14}   ({result['rows']:,} vectors; e2e: whole "
          "process with ray.init, job: the shards only)")
    for path in ("local", "ray"):
        print(f"{path:<8} {result[path]['e2e_vec_s']:14,.0f} {result[path]['job_vec_s']:14,.0f}")
    print(f"Ray overhead (score): e2e {result['overhead_e2e_vec_s']:+.1%}, job {result['overhead_job_vec_s']:+.1%} "
          "(target <= 15 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thumbs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pnsfw-bench"))
    parser.add_argument("--score-rows", type=int, default=0, help="also compare `score` on a store of N vectors")
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--ray-extra", default="", help="extra options of the --ray runs (e.g. '--actors 2')")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        clusters = start_cluster(Path(tmp))
        cluster = next(clusters)
        try:
            result: dict[str, Any] = {"cluster": warm_up(cluster.address, time.perf_counter() - started)}
            if args.thumbs:
                result["index"] = bench_index(args, cluster.address, Path(tmp))
            if args.score_rows:
                result["score"] = bench_score(args, cluster.address, Path(tmp))
        finally:
            clusters.close()
    if "index" in result:
        print_table(result["index"])
    if "score" in result:
        print_score_table(result["score"])
    if args.out:
        import ray

        report = {"machine": cpu_info(), "python": sys.version.split()[0], "ray": ray.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), **result}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
