"""Benchmark the index kinds on random unit vectors: build time, recall@10 vs exact, QPS, memory.

CPU (default): each kind of pnsfw.search.index (flat, hnsw, ivfpq as `auto`
would configure them for N) on N random unit vectors; recall@k against exact
search. `--gpu`: pnsfw.search.exact.TorchExact (tiled fp16 GEMM + top-k) on
N x 256 fp16 vectors generated on the GPU: batch 1 p50/p99, QPS at batch 1 and
--gpu-batches, recall@k against a flat fp32 search (exact, on a subset of
queries), GPU memory; a torch-profiler comparison with the previous path at
--profile-size; search from pinned host memory (--stream-sizes); dedup with
planted near-duplicates (--dedup-sizes). DESIGN section 10 targets.
Prints a table and writes JSON (machine, versions, figures) after every step.

    python scripts/bench_search.py --sizes 100k,300k --out bench_search.json
    python scripts/bench_search.py --gpu --gpu-sizes 1M,10M,100M --out bench_search_gpu.json
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


DEV = "cuda"  # --device cpu: a dry run of the GPU benchmark at small sizes (no figures)


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_memory() -> None:
    import gc

    import torch

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory() -> tuple[int, int]:
    """(bytes allocated, peak bytes allocated) on the GPU."""
    import torch

    return (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()) if DEV == "cuda" else (0, 0)


def gpu_unit_vectors(n: int, dim: int, seed: int) -> Any:
    """(n, dim) fp16 unit vectors made on the GPU in chunks (no host copy, no full fp32 array)."""
    import torch

    gen = torch.Generator(device=DEV).manual_seed(seed)
    out = torch.empty((n, dim), dtype=torch.float16, device=DEV)
    for s in range(0, n, 1 << 22):
        x = torch.randn((min(1 << 22, n - s), dim), generator=gen, device=DEV)
        out[s:s + len(x)] = torch.nn.functional.normalize(x, dim=1).half()
    return out


def full_topk(db: Any, queries: Any, k: int) -> Any:
    """The previous exact path (kept to profile it): fp16 matmul over 2 GB score blocks + torch.topk, merged."""
    import torch

    chunk = max(1, (1 << 31) // len(queries))
    sims, ids = [], []
    for s in range(0, len(db), chunk):
        top = torch.topk(queries @ db[s:s + chunk].T, k, dim=1)
        sims.append(top.values)
        ids.append(top.indices + s)
    best = torch.topk(torch.cat(sims, 1), k, dim=1)
    return best.values, torch.gather(torch.cat(ids, 1), 1, best.indices)


def flat_reference(db: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What a flat fp32 index returns over the fp16 rows: fp32 GEMM (no TF32) per 1M rows, exact top-k."""
    import torch

    from pnsfw.search.tiles import merge_topk

    q = torch.from_numpy(queries).to(DEV)
    best = None
    with torch.inference_mode():
        for s in range(0, len(db), 1 << 20):
            top = torch.topk(q @ db[s:s + (1 << 20)].float().T, k, dim=1)
            best = merge_topk(best, (top.values, top.indices + s), k)
    return best[0].cpu().numpy(), best[1].cpu().numpy()


def recall_vs_flat(index: Any, db: Any, queries: np.ndarray, k: int) -> dict[str, Any]:
    """recall@k by ids, and up to ties (a hit counts when its exact similarity is within TIE of the k-th)."""
    import torch

    true_sims, true_rows = flat_reference(db, queries, k)
    sims, rows = index.search(queries, k)
    exact = np.einsum("nd,nkd->nk", queries,
                      db[torch.from_numpy(rows.reshape(-1)).to(DEV)].float().cpu().numpy().reshape(*rows.shape, -1))
    hits = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, true_rows)])
    alone = np.stack([index.search(queries[i:i + 1], k)[1][0] for i in range(10)])  # the graph path
    tie = 5e-4  # the first stage multiplies an fp16-rounded query: |error| <= 2^-12 for unit vectors
    return {f"recall@{k}": round(float(hits), 4),
            f"recall@{k}_up_to_ties": round(float(np.mean(exact >= true_sims[:, -1:] - tie)), 4),
            "max_similarity_error": float(np.abs(np.sort(sims, 1) - np.sort(true_sims, 1)).max()),
            "singles_equal_batch": float(np.mean(alone == rows[:10])),
            "recall_queries": len(queries)}


def wall(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_batches(index: Any, queries: np.ndarray, batches: list[int], k: int, singles: int) -> dict[str, Any]:
    """Batch 1: each of `singles` queries alone (p50, p99, QPS); larger batches: median of repeats."""
    for b in [1, *batches]:  # warm-up: kernels compiled and tuned, graphs captured
        index.search(queries[:b], k)
    lat = np.array([wall(lambda i=i: index.search(queries[i:i + 1], k)) for i in range(singles)])
    row = {"p50_ms_batch1": round(1000 * float(np.median(lat)), 3),
           "p99_ms_batch1": round(1000 * float(np.percentile(lat, 99)), 3), "qps_batch1": round(1 / lat.mean(), 1)}
    for b in batches:
        first = wall(lambda b=b: index.search(queries[:b], k))
        reps = int(np.clip(2.0 / max(first, 1e-4), 3, 20))
        t = float(np.median([wall(lambda b=b: index.search(queries[:b], k)) for _ in range(reps)]))
        row[f"qps_batch{b}"] = round(b / t, 1)
        row[f"ms_batch{b}"] = round(1000 * t, 2)
    return row


def kernel_table(fn: Callable[[], Any], rows: int = 8) -> list[dict[str, Any]]:
    """The GPU kernels of one call of fn by device time (torch profiler), printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    events = [e for e in prof.key_averages() if _device_us(e) > 0]
    events.sort(key=_device_us, reverse=True)
    total = sum(_device_us(e) for e in events) or 1.0
    table = [{"kernel": e.key[:90], "calls": e.count, "ms": round(_device_us(e) / 1000, 3),
              "share": round(_device_us(e) / total, 3)} for e in events[:rows]]
    for t in table:
        print(f"    {t['ms']:>9.3f} ms {100 * t['share']:5.1f}% x{t['calls']:<5} {t['kernel']}", flush=True)
    return table


def _device_us(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_10m(index: Any, db: Any, queries: np.ndarray, k: int) -> dict[str, Any]:
    """Batch 1024: the previous path (full score blocks + torch.topk) against the tiled one, kernel by kernel."""
    import torch

    q = torch.from_numpy(queries[:1024]).to(DEV).half()
    print("  profile, previous path (fp16 GEMM to 2 GB score blocks + torch.topk), batch 1024:", flush=True)
    with torch.inference_mode():
        old_ms = 1000 * float(np.median([wall(lambda: (full_topk(db, q, k), sync()))
                                         for _ in range(3)]))
        old = kernel_table(lambda: full_topk(db, q, k))
    print(f"  profile, tiled path (kernel {index.kernel}), batch 1024:", flush=True)
    new = kernel_table(lambda: index.search(queries[:1024], k))
    return {"previous_ms_batch1024": round(old_ms, 2), "previous_qps_batch1024": round(1024 / old_ms * 1000, 1),
            "previous_kernels": old, "tiled_kernels": new, "torch_kernel": torch_first_stage(db, queries, k)}


def torch_first_stage(db: Any, queries: np.ndarray, k: int) -> dict[str, Any]:
    """The same tiles with the torch GEMM as first stage (the path without Triton): batch 1 and 1024."""
    from pnsfw.search.exact import TorchExact

    index = TorchExact(np.arange(len(db)), db, DEV, kernel="torch")
    for b in (1, 1024):
        index.search(queries[:b], k)
    lat = [wall(lambda i=i: index.search(queries[i:i + 1], k)) for i in range(50)]
    t = float(np.median([wall(lambda: index.search(queries[:1024], k)) for _ in range(3)]))
    return {"p50_ms_batch1": round(1000 * float(np.median(lat)), 3), "qps_batch1024": round(1024 / t, 1)}


def bench_gpu_size(n: int, args: argparse.Namespace) -> dict[str, Any]:

    from pnsfw.search.exact import TorchExact

    reset_memory()
    db = gpu_unit_vectors(n, args.dim, 0)
    queries = unit_vectors(max(args.gpu_batches), args.dim, 1)
    started = time.perf_counter()
    index = TorchExact(np.arange(n), db, DEV)
    row: dict[str, Any] = {"kind": "torch-exact-tiled", "n": n, "dim": args.dim, **index.describe(),
                           "load_s": round(time.perf_counter() - started, 2)}
    base = memory()[0]
    row.update(time_batches(index, queries, args.gpu_batches, args.k, args.singles))
    row.update(recall_vs_flat(index, db, queries[:args.recall_queries], args.k))
    row["db_gb"] = round(n * args.dim * 2 / 1e9, 2)
    row["peak_gpu_gb"] = round(memory()[1] / 1e9, 2)
    row["search_workspace_gb"] = round((memory()[1] - base) / 1e9, 2)
    if n == args.profile_size:
        row["profile"] = _guard(lambda: profile_10m(index, db, queries, args.k))
    return row


def bench_streamed(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The database in pinned host memory, streamed to the GPU block by block (stores larger than the GPU)."""
    import torch

    from pnsfw.search.exact import STREAM_BLOCK, TorchExact

    reset_memory()
    db = gpu_unit_vectors(n, args.dim, 0)
    host = torch.empty(db.shape, dtype=db.dtype, pin_memory=DEV == "cuda")
    host.copy_(db)
    queries = unit_vectors(max(args.gpu_batches), args.dim, 1)
    index = TorchExact(np.arange(n), host, DEV, resident=False)
    copy_s = wall(lambda: (torch.empty_like(db).copy_(host, non_blocking=True), sync()))
    row: dict[str, Any] = {"kind": "torch-exact-streamed", "n": n, **index.describe(),
                           "stream_block_mb": STREAM_BLOCK >> 20, "h2d_gb_s": round(host.nbytes / copy_s / 1e9, 1)}
    for b in args.gpu_batches[-2:]:
        index.search(queries[:b], args.k)
        t = float(np.median([wall(lambda b=b: index.search(queries[:b], args.k)) for _ in range(3)]))
        row[f"qps_batch{b}"], row[f"ms_batch{b}"] = round(b / t, 1), round(1000 * t, 1)
    row.update(recall_vs_flat(index, db, queries[:args.recall_queries], args.k))
    return row


def planted_duplicates(n: int, dim: int, originals: int, copies: int) -> tuple[Any, np.ndarray]:
    """Random unit rows where `originals` rows have `copies` noisy copies in all (cosine ~0.97-0.999) at random
    rows; the planted group (index of its original) of every row, -1 for the rest."""
    import torch

    db = gpu_unit_vectors(n, dim, 2)
    gen = torch.Generator(device=DEV).manual_seed(3)
    perm = torch.randperm(n, generator=gen, device=DEV)
    orig, dup = perm[:originals], perm[originals:originals + copies]
    of = torch.cat([torch.arange(originals, device=DEV),
                    torch.randint(0, originals, (copies - originals,), generator=gen, device=DEV)])
    eps = 0.05 + 0.2 * torch.rand((copies, 1), generator=gen, device=DEV)
    noise = torch.randn((copies, dim), generator=gen, device=DEV) / dim ** 0.5
    db[dup] = torch.nn.functional.normalize(db[orig[of]].float() + eps * noise, dim=1).half()
    planted = np.full(n, -1, np.int64)
    planted[orig.cpu().numpy()] = np.arange(originals)
    planted[dup.cpu().numpy()] = of.cpu().numpy()
    return db, planted


def bench_dedup(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """`dedup`'s GPU pair finder + components on n rows with planted near-duplicates; checked against the plan."""

    from pnsfw.search.dedup import exact_torch_pairs, group_pairs

    reset_memory()
    originals, copies = n // 50, n * 3 // 100
    db, planted = planted_duplicates(n, args.dim, originals, copies)
    sync()
    started = time.perf_counter()
    groups, _, sims = group_pairs(n, exact_torch_pairs(db, args.dedup_threshold, device=DEV))
    seconds = time.perf_counter() - started
    grouped = groups >= 0
    same = np.array_equal(grouped, planted >= 0) and len(np.unique(groups[grouped])) == originals and \
        len(np.unique(np.stack([groups[grouped], planted[grouped]]), axis=1)[0]) == originals
    return {"kind": "dedup-exact-gpu", "n": n, "threshold": args.dedup_threshold, "planted_groups": originals,
            "planted_copies": copies, "rows_in_groups": int(grouped.sum()), "groups": int(groups.max() + 1),
            "groups_equal_planted": bool(same), "min_nearest_similarity": float(sims[grouped].min()),
            "seconds": round(seconds, 1), "pair_tflop": round(n * n * args.dim / 1e12, 1)}


def triton_tuning() -> dict[str, Any]:
    from pnsfw.search.triton_kernel import tuning

    return tuning()


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One failed measurement is reported and the others still run."""
    import traceback

    try:
        return fn()
    except Exception as exc:  # a benchmark reports every failure and goes on
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def bench_gpu(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    steps = [("search", n, bench_gpu_size) for n in args.gpu_sizes]
    steps += [("streamed", n, bench_streamed) for n in args.stream_sizes]
    steps += [("dedup", n, bench_dedup) for n in args.dedup_sizes]
    for what, n, fn in steps:
        started = time.perf_counter()
        row = {"what": what, "n": n, **_guard(lambda fn=fn, n=n: fn(n, args))}
        row["bench_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        rows.append(row)
        report["triton_tuning"] = _guard(triton_tuning)
        write_report(args.out, {**report, "results": rows})  # what is measured survives a later failure
    print_gpu_table(rows, args)
    return rows


def print_gpu_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{'what':<9}{'n':>12} {'b1 p50':>8} {'b1 p99':>8} " +
          " ".join(f"{'qps b' + str(b):>11}" for b in [1, *args.gpu_batches]) + f" {'recall':>7} {'peak GB':>8}")
    for r in rows:
        qps = " ".join(f"{r.get(f'qps_batch{b}', float('nan')):>11,.0f}" for b in [1, *args.gpu_batches])
        print(f"{r['what']:<9}{r['n']:>12,} {r.get('p50_ms_batch1', float('nan')):>8.3f} "
              f"{r.get('p99_ms_batch1', float('nan')):>8.3f} {qps} "
              f"{r.get(f'recall@{args.k}_up_to_ties', float('nan')):>7.4f} {r.get('peak_gpu_gb', float('nan')):>8.2f}"
              + (f"  dedup {r['seconds']} s, groups equal planted: {r['groups_equal_planted']}"
                 if "seconds" in r else "") + (f"  ERROR {r['error']}" if "error" in r else ""))


def write_report(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


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
    try:
        import triton
    except ImportError:
        triton = None
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "faiss": getattr(faiss, "__version__", None), "torch": torch.__version__, "numpy": np.__version__,
            "triton": getattr(triton, "__version__", None), "torch_cuda": torch.version.cuda,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gb=round(props.total_memory / 1e9, 1), sms=props.multi_processor_count)
    return info


def main() -> None:
    sizes = lambda text: [parse_size(s) for s in text.split(",") if s]  # noqa: E731
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
    parser.add_argument("--gpu", action="store_true", help="Exact tiled fp16 search (pnsfw.search.exact) on CUDA.")
    parser.add_argument("--gpu-sizes", type=sizes, default=sizes("1M,10M,100M"), help="GPU: resident sizes.")
    parser.add_argument("--gpu-batches", type=lambda t: [int(b) for b in t.split(",")], default=[64, 1024, 4096],
                        help="GPU: batch sizes for QPS (batch 1 is always timed).")
    parser.add_argument("--stream-sizes", type=sizes, default=sizes("10M"),
                        help="GPU: sizes searched from pinned host memory ('' for none).")
    parser.add_argument("--dedup-sizes", type=sizes, default=sizes("10M"), help="GPU: dedup sizes ('' for none).")
    parser.add_argument("--dedup-threshold", type=float, default=0.95)
    parser.add_argument("--recall-queries", type=int, default=100, help="GPU: queries checked against flat fp32.")
    parser.add_argument("--profile-size", type=parse_size, default=parse_size("10M"),
                        help="GPU: the size profiled at batch 1024 (previous path vs tiled).")
    parser.add_argument("--programs-per-sm", type=int, default=0,
                        help="GPU: override the Triton kernel's grid (programs per SM; 0: the package's default).")
    parser.add_argument("--device", default="cuda", help="GPU mode on cpu: a dry run of the code at small sizes.")
    parser.add_argument("--out", default="bench_search.json")
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if args.programs_per_sm:
        from pnsfw.search import triton_kernel

        triton_kernel.PROGRAMS_PER_SM = args.programs_per_sm
    report = {"machine": machine(), "mode": "gpu" if args.gpu else "cpu", "k": args.k,
              "args": {k: v for k, v in vars(args).items()}}
    report["results"] = bench_gpu(args, report) if args.gpu else bench_cpu(args)
    write_report(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
