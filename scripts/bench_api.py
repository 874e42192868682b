"""API load test: /v1/search and /v1/score on a store of N random vectors, clients in other processes.

Usage: python scripts/bench_api.py [--vectors 1M] [--kind auto] [--device auto] [--search auto]
                                   [--clients N] [--concurrency 32] [--seconds 15] [--warmup 2]
                                   [--workdir /tmp/pnsfw-bench-api] [--out bench_api.json]

Builds (once, reused) a store of N random unit vectors (written through StoreWriter; the manifest names a tiny
random CLIP checkpoint so the server starts offline), a FAISS index (`--kind`; none: no index), and a classifier
trained for one epoch on random labels of 2,000 ids (without scikit-learn/matplotlib: Keras fit + save only; without
TensorFlow, KERAS_BACKEND=torch). Starts one `pnsfw serve` worker on a free loopback port (`--device`,
`--search` passed through), then `--clients` processes drive each endpoint with `--concurrency` keep-alive
connections in all, each a minimal raw asyncio HTTP/1.1 client (one pre-built request, no per-request client
library cost), for `--warmup` + `--seconds`; only requests completed in the measured window count. Prints
req/s, p50/p99 latency, non-200 counts and the server's CPU per request (whole process and its event-loop
thread, from /proc), and writes JSON with the machine (CPU model, cores, GPU), versions, index and search
backend. DESIGN §9 target: /v1/search >= 2,000 req/s per worker, p99 <= 20 ms on 1M vectors.
"""

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from make_checkpoint import make_checkpoint

from pnsfw.indexer.projection import random_projection
from pnsfw.store import Store
from pnsfw.store.shards import embedding_array
from pnsfw.store.sizes import parse_size

SHARD = 250_000


def _shard(writer: Any, count: int, rng: np.random.Generator) -> pa.Table:
    ids = writer.next_ids(count)
    vectors = rng.standard_normal((count, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    columns = {"id": ids, "uri": [f"bench://{i}" for i in ids], "source": ["bench://"] * count,
               "sha256": [""] * count, "width": pa.array(np.zeros(count, np.int32)),
               "height": pa.array(np.zeros(count, np.int32)), "embedding": embedding_array(vectors.astype(np.float16))}
    return pa.table(columns)  # the store adds uri_hash


def build_store(root: Path, count: int, kind: str) -> Path:
    """Random vectors + index + a one-epoch classifier; skipped when the store already has them."""
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.search.index import reindex

    if Store(root).exists and "bench" in Store(root).manifest.models and Store.open(root).rows == count:
        return root
    checkpoint = make_checkpoint("tiny", root.parent / "tiny-clip.pt")
    encoder = load_encoder(str(checkpoint), "cpu", "fp32")
    rng = np.random.default_rng(0)
    with Store(root).writer() as writer:
        writer.set_space(encoder.describe(), random_projection(encoder.width))
        for start in range(0, count, SHARD):
            writer.commit(_shard(writer, min(SHARD, count - start), rng), None)
    if kind != "none":  # `serve --search exact` reads the vectors, not the index (and needs no faiss)
        print(f"[bench] index: {reindex(root, kind)}", flush=True)
    picked = rng.choice(count, 2000, replace=False)
    train(root, picked)
    return root


def train(root: Path, picked: np.ndarray) -> None:
    """One epoch on random labels: `train_classifier` when scikit-learn and matplotlib are there, else Keras
    fit + save with the metadata the server reads (as scripts/bench_score.py's `fit` mode)."""
    import importlib.util

    from pnsfw.classifier.train import TrainOptions, train_classifier

    labels = root.parent / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"{i},{'nsfw' if i % 2 else 'sfw'}\n" for i in picked))
    if all(importlib.util.find_spec(m) is not None for m in ("sklearn", "matplotlib")):
        train_classifier(root, str(labels), TrainOptions(name="bench", epochs=1))
        return
    from pnsfw.classifier.keras_io import build_model, keras_layers
    from pnsfw.classifier.model import model_paths
    from pnsfw.classifier.weights import save_weights

    store = Store.open(root)
    x = store.vectors()[1][picked].astype(np.float32)
    y = (picked % 2).astype(np.float32)[:, None]
    model = build_model(store.dim, 1)
    model.fit(x, y, epochs=1, batch_size=256, verbose=0)
    from pnsfw.store.artifacts import ModelStage

    staged = ModelStage(store, "bench")
    paths = model_paths(staged.folder, "bench")
    model.save(paths["keras"])
    save_weights(paths["weights"], keras_layers(model))
    paths["meta"].write_text(json.dumps({"name": "bench", "classes": ["nsfw", "sfw"], "nsfw_classes": ["nsfw"],
                                         "threshold": 0.5, "space": store.space, "dim": store.dim}))
    staged.commit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def start_server(store: Path, port: int, device: str, search: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pnsfw.cli", "serve", "--store", str(store), "--model", "bench",
           "--port", str(port), "--device", device, "--search", search, "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(3000):
        try:
            get_json(port, "/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def request_bytes(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _connection(port: int, requests: list[bytes], offset: int, window: tuple[float, float],
                      latencies: list[float], codes: dict[int, int]) -> None:
    """One keep-alive connection sending requests back to back until the window ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start, stop = window
    i = offset
    try:
        while True:
            sent = time.perf_counter()
            if sent >= stop:
                return
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if done >= start and done < stop:
                status = int(head[9:12])
                codes[status] = codes.get(status, 0) + 1
                latencies.append(done - sent)
            i += 1
    finally:
        writer.close()


def drive(port: int, requests: list[bytes], connections: int, offset: int, start_at: float, stop_at: float,
          queue: Any) -> None:
    """One client process: `connections` connections; measured window [start_at, stop_at) in time.time()."""
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def main() -> None:
        shift = time.perf_counter() - time.time()
        window = (start_at + shift, stop_at + shift)
        await asyncio.gather(*(_connection(port, requests, offset + c * 7, window, latencies, codes)
                               for c in range(connections)))

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
    queue.put((np.asarray(latencies, np.float64), codes))


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(process CPU s, main-thread = event-loop CPU s) of a Linux process, from /proc."""
    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")
    except OSError:
        return float("nan"), float("nan")


def run_endpoint(port: int, server_pid: int, path: str, bodies: list[bytes],
                 args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    requests = [request_bytes(path, b) for b in bodies]
    clients = max(1, min(args.clients, args.concurrency))
    start_at = time.time() + 2.0 + args.warmup  # 2 s for the client processes to start
    stop_at = start_at + args.seconds
    share = [args.concurrency // clients + (c < args.concurrency % clients) for c in range(clients)]
    procs = [ctx.Process(target=drive, args=(port, requests, share[c], c * 1000, start_at, stop_at, queue))
             for c in range(clients)]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = cpu_seconds(server_pid)
    time.sleep(max(0.0, stop_at - time.time()))
    cpu_after = cpu_seconds(server_pid)
    parts = [queue.get(timeout=args.seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    return summarise(parts, args.seconds, [a - b for a, b in zip(cpu_after, cpu_before)])


def summarise(parts: list[tuple[np.ndarray, dict[int, int]]], seconds: float, cpu: list[float]) -> dict[str, Any]:
    ms = np.concatenate([p[0] for p in parts]) * 1000
    codes: dict[int, int] = {}
    for _, part in parts:
        for code, count in part.items():
            codes[code] = codes.get(code, 0) + count
    n = len(ms)
    pct = (lambda q: float(np.percentile(ms, q))) if n else (lambda q: float("nan"))
    return {"requests": n, "seconds": seconds, "req_per_s": n / seconds, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": float(ms.max()) if n else float("nan"), "codes": codes,
            "non_200": n - codes.get(200, 0), "server_cpu_ms_per_req": cpu[0] / n * 1000 if n else None,
            "server_loop_cpu_ms_per_req": cpu[1] / n * 1000 if n else None}


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    versions = {}
    for name in ("numpy", "torch", "faiss-cpu", "faiss-gpu", "fastapi", "starlette", "uvicorn", "pydantic",
                 "pydantic-core", "uvloop", "httptools", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": gpu, "python": platform.python_version(), "versions": versions}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", default="1M", type=parse_size)
    parser.add_argument("--kind", default="auto",
                        help="FAISS index kind of the store (pnsfw reindex --kind); none: no index (--search exact)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="pnsfw serve --device")
    parser.add_argument("--search", default="auto", choices=["auto", "exact", "index"], help="pnsfw serve --search")
    parser.add_argument("--clients", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="client processes (default min(8, cores/2))")
    parser.add_argument("--concurrency", type=int, default=32, help="keep-alive connections in all")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before the measured window")
    parser.add_argument("--endpoints", default="/v1/search,/v1/score")
    parser.add_argument("--workdir", default="/tmp/pnsfw-bench-api")
    parser.add_argument("--out", default="bench_api.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if "KERAS_BACKEND" not in os.environ and importlib.util.find_spec("tensorflow") is None:
        os.environ["KERAS_BACKEND"] = "torch"  # the server inherits it
    root = Path(args.workdir) / f"store-{args.vectors}-{args.kind.replace('/', '_')}"
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_store(root, args.vectors, args.kind)
    print(f"[bench] store ready in {time.perf_counter() - started:.1f} s", flush=True)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((256, 256)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bodies = {"/v1/search": [json.dumps({"embedding": q.tolist(), "k": 10}).encode() for q in queries],
              "/v1/score": [json.dumps({"embedding": q.tolist()}).encode() for q in queries]}
    port = free_port()
    started = time.perf_counter()
    server = start_server(root, port, args.device, args.search, root.parent / "serve.log")
    try:
        print(f"[bench] server up in {time.perf_counter() - started:.1f} s", flush=True)
        stats = get_json(port, "/v1/stats")
        print(f"[bench] search backend: {stats.get('search')}", flush=True)
        results = {path: run_endpoint(port, server.pid, path, bodies[path], args)
                   for path in args.endpoints.split(",")}
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(args, root, stats, results)


def report(args: argparse.Namespace, root: Path, stats: dict[str, Any], results: dict[str, Any]) -> None:
    print(f"{'endpoint':12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'non-200':>8} "
          f"{'cpu ms/req':>11} {'loop ms/req':>12}  codes")
    for path, r in results.items():
        cpu, loop = r["server_cpu_ms_per_req"] or float("nan"), r["server_loop_cpu_ms_per_req"] or float("nan")
        print(f"{path:12} {r['req_per_s']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['p999_ms']:9.2f} "
              f"{r['max_ms']:8.2f} {r['non_200']:8d} {cpu:11.3f} {loop:12.3f}  {r['codes']}")
    from pnsfw.store.artifacts import index_meta

    index = index_meta(Store.open(root)) or {}
    info = {"machine": machine_info(), "vectors": args.vectors,
            "index": {k: index.get(k) for k in ("kind", "factory", "search_params")},
            "search_backend": stats.get("search"), "device": args.device, "search": args.search,
            "clients": args.clients, "concurrency": args.concurrency, "seconds": args.seconds,
            "warmup": args.warmup, "results": results}
    Path(args.out).write_text(json.dumps(info, indent=2))
    print(f"[bench] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
