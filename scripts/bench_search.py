"""Benchmark the index kinds on random unit vectors: build time, recall@10 vs exact, QPS, memory.

CPU (default): each kind of pnsfw.search.index (flat, hnsw, ivfpq as `auto`
would configure them for N) on N random unit vectors; recall@k against exact
search. `--gpu`: exact fp16 search with torch on CUDA (batch-1 p50 latency,
batch-1024 QPS) for 1M and 10M x 256 (DESIGN section 9 targets).
Prints a table and writes JSON (machine, versions, figures).

    python scripts/bench_search.py --sizes 100k,300k --out bench_search.json
    python scripts/bench_search.py --gpu --gpu-sizes 1M,10M --out bench_search_gpu.json
"""

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pnsfw.search.index import fill_index, make_plan
from pnsfw.store.sizes import parse_size


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_vectors(n: int, dim: int, seed: int, centres: int = 1000, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around `centres` random directions: closer to real CLIP embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    middle = unit_vectors(centres, dim, 12345)  # the same centres for data and queries
    x = middle[rng.integers(0, centres, n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


DATA = {"random": unit_vectors, "clustered": clustered_vectors}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def index_bytes(index: Any) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def bench_kind(kind: str, data: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int,
               budget: int, singles: int) -> dict[str, Any]:
    n, dim = data.shape
    plan = make_plan(kind, n, dim, budget)
    rng = np.random.default_rng(1)
    sample = lambda count: data[rng.choice(n, min(count or n, n), replace=False)]  # noqa: E731
    batches = ((np.arange(s, min(s + 65536, n), dtype=np.int64), data[s:s + 65536]) for s in range(0, n, 65536))
    index, build_s = timed(lambda: fill_index(plan, dim, sample, batches))
    (_, found), batch_s = timed(lambda: index.search(queries, k))
    single_times = [timed(lambda q=q: index.search(q[None, :], k))[1] for q in queries[:singles]]
    return {"kind": kind, "factory": plan.factory, "search_params": plan.search_params, "n": n, "dim": dim,
            "build_s": round(build_s, 2), f"recall@{k}": round(recall(found, truth), 4),
            "qps_batch1": round(len(single_times) / sum(single_times), 1),
            "p50_ms_batch1": round(1000 * float(np.median(single_times)), 3),
            f"qps_batch{len(queries)}": round(len(queries) / batch_s, 1),
            "index_mb": round(index_bytes(index) / 2**20, 1)}


def bench_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import faiss

    rows = []
    for n in args.sizes:
        data = DATA[args.data](n, args.dim, 0)
        queries = DATA[args.data](args.queries, args.dim, 1)
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(data)
        truth = exact.search(queries, args.k)[1]
        del exact
        for kind in args.kinds:
            row = bench_kind(kind, data, queries, truth, args.k, args.max_memory, args.singles)
            row["data"] = args.data
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            print_row(row, args.k)
            rows.append(row)
    return rows


def gpu_unit_vectors(n: int, dim: int, seed: int) -> Any:
    """(n, dim) fp16 unit vectors made on the GPU in chunks (10M x 256 fp32 would not be needed at once)."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = torch.empty((n, dim), dtype=torch.float16, device="cuda")
    for s in range(0, n, 1 << 20):
        x = torch.randn((min(1 << 20, n - s), dim), generator=gen, device="cuda")
        out[s:s + len(x)] = torch.nn.functional.normalize(x, dim=1).half()
    return out


def gpu_topk(db: Any, queries: Any, k: int, chunk: int) -> Any:
    """Exact top-k by fp16 matmul over database chunks, merged."""
    import torch

    if len(db) <= chunk:
        return torch.topk(queries @ db.T, k, dim=1)
    sims, ids = [], []
    for s in range(0, len(db), chunk):
        top = torch.topk(queries @ db[s:s + chunk].T, k, dim=1)
        sims.append(top.values)
        ids.append(top.indices + s)
    sims, ids = torch.cat(sims, 1), torch.cat(ids, 1)
    best = torch.topk(sims, k, dim=1)
    return torch.return_types.topk((best.values, torch.gather(ids, 1, best.indices)))


def cuda_time(fn: Callable[[], Any]) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_gpu_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    db = gpu_unit_vectors(n, args.dim, 0)
    queries = gpu_unit_vectors(args.batch, args.dim, 1)
    chunk = max(1, (1 << 31) // args.batch)  # keep the (batch x chunk) fp16 similarity block at 4 GB
    for _ in range(3):
        gpu_topk(db, queries[:1], args.k, n), gpu_topk(db, queries, args.k, chunk)
    singles = [cuda_time(lambda i=i: gpu_topk(db, queries[i:i + 1], args.k, n)) for i in range(args.singles)]
    batches = [cuda_time(lambda: gpu_topk(db, queries, args.k, chunk)) for _ in range(10)]
    found = gpu_topk(db, queries[:100], args.k, chunk).indices.cpu().numpy()
    exact = torch.topk(queries[:100].float() @ db.float().T, args.k, dim=1).indices.cpu().numpy() \
        if n <= 2_000_000 else found
    return {"kind": "torch-exact-fp16", "n": n, "dim": args.dim, "device": torch.cuda.get_device_name(),
            "p50_ms_batch1": round(1000 * float(np.median(singles)), 3),
            "p99_ms_batch1": round(1000 * float(np.percentile(singles, 99)), 3),
            f"qps_batch{args.batch}": round(args.batch / float(np.median(batches)), 1),
            f"recall@{args.k}_vs_fp32": round(recall(found, exact), 4) if n <= 2_000_000 else None}


def bench_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    rows = []
    for n in args.gpu_sizes:
        row = bench_gpu_size(n, args)
        print(json.dumps(row))
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def print_row(row: dict[str, Any], k: int) -> None:
    batch = next(key for key in row if key.startswith("qps_batch") and key != "qps_batch1")
    print(f"{row['n']:>10,}  {row['kind']:<6} {row['factory']:<18} build {row['build_s']:>7.1f} s  "
          f"recall@{k} {row[f'recall@{k}']:.3f}  b1 {row['qps_batch1']:>8.1f} q/s ({row['p50_ms_batch1']:.2f} ms)  "
          f"b{batch[9:]} {row[batch]:>9.1f} q/s  {row['index_mb']:>8.1f} MB", flush=True)


def machine() -> dict[str, Any]:
    import torch

    try:
        import faiss
    except ImportError:  # the GPU machine may have torch alone
        faiss = None
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "faiss": getattr(faiss, "__version__", None), "torch": torch.__version__, "numpy": np.__version__,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main() -> None:
    sizes = lambda text: [parse_size(s) for s in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes, default=sizes("100k,300k"), help="CPU: vector counts.")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"],
                        help="Kinds as `pnsfw reindex --kind` takes them (factory strings too).")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--data", default="random", choices=sorted(DATA),
                        help="random: uniform on the sphere (worst case for ANN); clustered: 1000 clusters.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1024, help="CPU: queries (one batch of them).")
    parser.add_argument("--singles", type=int, default=200, help="Queries timed one at a time.")
    parser.add_argument("--max-memory", type=parse_size, default=parse_size("16G"))
    parser.add_argument("--gpu", action="store_true", help="Exact fp16 torch search on CUDA instead.")
    parser.add_argument("--gpu-sizes", type=sizes, default=sizes("1M,10M"))
    parser.add_argument("--batch", type=int, default=1024, help="GPU: batch size for the QPS figure.")
    parser.add_argument("--out", default="bench_search.json")
    args = parser.parse_args()
    rows = bench_gpu(args) if args.gpu else bench_cpu(args)
    report = {"machine": machine(), "mode": "gpu" if args.gpu else "cpu", "k": args.k, "results": rows,
              "args": {k: v for k, v in vars(args).items()}}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
