"""API load test: /v1/search and /v1/score on a store of N random vectors, clients in a second process.

Usage: python scripts/bench_api.py [--vectors 1M] [--kind auto] [--concurrency 16] [--seconds 15]
                                   [--workdir /tmp/pnsfw-bench-api] [--out bench_api.json]

Builds (once, reused) a store of N random unit vectors (written through StoreWriter; the manifest names a tiny
random CLIP checkpoint so the server starts offline), a FAISS index (`--kind`), and a classifier trained for
one epoch on random labels of 2,000 ids. Starts `pnsfw serve` on a free loopback port, then a client process
drives each endpoint with `--concurrency` keep-alive connections for `--seconds`, and prints req/s and
p50/p99 latency. DESIGN §9 target: /v1/search >= 2,000 req/s per worker, p99 <= 20 ms on 1M vectors.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoint import make_checkpoint  # noqa: E402

from pnsfw.indexer.projection import random_projection  # noqa: E402
from pnsfw.store import Store  # noqa: E402
from pnsfw.store.shards import embedding_array, shard_schema  # noqa: E402
from pnsfw.store.sizes import parse_size  # noqa: E402

SHARD = 250_000


def _shard(writer: Any, count: int, rng: np.random.Generator) -> pa.Table:
    ids = writer.next_ids(count)
    vectors = rng.standard_normal((count, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    columns = {"id": ids, "uri": [f"bench://{i}" for i in ids], "source": ["bench://"] * count,
               "sha256": [""] * count, "width": pa.array(np.zeros(count, np.int32)),
               "height": pa.array(np.zeros(count, np.int32)), "embedding": embedding_array(vectors.astype(np.float16))}
    return pa.table(columns, schema=shard_schema(256))


def build_store(root: Path, count: int, kind: str) -> Path:
    """Random vectors + index + a one-epoch classifier; skipped when the store already has them."""
    from pnsfw.classifier.train import TrainOptions, train_classifier
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.search.index import reindex

    if (root / "models" / "bench.keras").exists() and Store.open(root).rows == count:
        return root
    checkpoint = make_checkpoint("tiny", root.parent / "tiny-clip.pt")
    encoder = load_encoder(str(checkpoint), "cpu", "fp32")
    rng = np.random.default_rng(0)
    with Store(root).writer() as writer:
        writer.set_space(encoder.describe(), random_projection(encoder.width))
        for start in range(0, count, SHARD):
            writer.commit(_shard(writer, min(SHARD, count - start), rng), None)
    print(f"[bench] index: {reindex(root, kind)}", flush=True)
    labels = root.parent / "labels.csv"
    picked = rng.choice(count, 2000, replace=False)
    labels.write_text("id,label\n" + "".join(f"{i},{'nsfw' if i % 2 else 'sfw'}\n" for i in picked))
    train_classifier(root, str(labels), TrainOptions(name="bench", epochs=1))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "pnsfw.cli", "serve", "--store", str(store), "--model", "bench",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


async def _client(url: str, bodies: list[bytes], stop: float, latencies: list[float], codes: dict[int, int]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30, headers={"content-type": "application/json"}) as client:
        i = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            response = await client.post(url, content=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - started)
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            i += 1


def drive(url: str, bodies: list[bytes], concurrency: int, seconds: float, queue: Any) -> None:
    """Runs in the client process: `concurrency` connections for `seconds`; puts the figures on queue."""
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def main() -> None:
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_client(url, bodies, stop, latencies, codes) for _ in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    queue.put({"requests": len(latencies), "seconds": elapsed, "req_per_s": len(latencies) / elapsed,
               "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "codes": codes})


def run_endpoint(port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    queue: Any = multiprocessing.get_context("spawn").Queue()
    url = f"http://127.0.0.1:{port}{path}"
    drive_process = multiprocessing.get_context("spawn").Process(
        target=drive, args=(url, bodies, concurrency, seconds, queue))
    drive_process.start()
    result = queue.get(timeout=seconds + 120)
    drive_process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", default="1M", type=parse_size)
    parser.add_argument("--kind", default="auto")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--workdir", default="/tmp/pnsfw-bench-api")
    parser.add_argument("--out", default="bench_api.json")
    args = parser.parse_args()
    root = Path(args.workdir) / f"store-{args.vectors}-{args.kind.replace('/', '_')}"
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_store(root, args.vectors, args.kind)
    print(f"[bench] store ready in {time.perf_counter() - started:.1f} s", flush=True)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((256, 256)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    endpoints = {"/v1/search": [json.dumps({"embedding": q.tolist(), "k": 10}).encode() for q in queries],
                 "/v1/score": [json.dumps({"embedding": q.tolist()}).encode() for q in queries]}
    port = free_port()
    server = start_server(root, port)
    try:
        results = {path: run_endpoint(port, path, bodies, args.concurrency, args.seconds)
                   for path, bodies in endpoints.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{'endpoint':12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  codes")
    for path, r in results.items():
        print(f"{path:12} {r['req_per_s']:8.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}  {r['codes']}")
    index = json.loads((root / "index" / "index.json").read_text())
    info = {"machine": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
            "vectors": args.vectors, "index": {k: index.get(k) for k in ("kind", "factory", "search_params")},
            "concurrency": args.concurrency, "seconds": args.seconds, "results": results}
    Path(args.out).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
