"""Store bookkeeping at scale: open, info, incremental index RSS, lookups and serve on stores of 1M..20M rows.

Usage: python scripts/bench_store_scale.py [--rows 1M,5M,20M] [--shard-size 50k] [--workdir /tmp/pnsfw-bench-scale]
                                           [--s3-rows 1M] [--out docs/bench_store_scale.json]

One store grows through the sizes (synthetic shards written through StoreWriter.commit_shards: random unit
fp16 vectors, realistic uris, a caption column; the manifest names a tiny random CLIP checkpoint so `index`
and `serve` run offline; a zero-shot model MODEL scores it with `pnsfw score`). At each size, in fresh child
processes: `Store.open` time (median of 3), `pnsfw info --json` wall time, peak RSS (VmHWM; and private /
file-backed RSS at exit) of `pnsfw index --no-faiss` adding 1,000 new image files (also into an empty store of
the same space, for the per-row slope), bytes per row on disk (shards; manifest + checkpoint), `Store.lookup`
latency (cold: a row group not read before; warm: again), and two `pnsfw serve` runs (a small IVF-PQ index so
the index is not what is measured): without a model (the CLIP encoder loading in the background) and with
MODEL and --lazy-encoder: time to /health, RSS there minus the index file, `/v1/items/{id}` and `/v1/search
{id}` latency over random ids, and RSS once the background loads settled. Prints the per-row slopes between the
two largest sizes and their extrapolation to 1B rows. Sizes already in --out from an earlier run are kept
(so 20M can be a run of its own on the same --workdir). `--s3-rows`: at that size the store (without scores)
is copied to a local folder and to a SeaweedFS server (tests/s3_server.py); on both, `score` of every row,
`index` of 1,000 files and a serve; S3 throughput relative to the local copy.
DESIGN §10 target at 20M rows: open <= 1 s; incremental index RSS <= 16 bytes/row + 300 MB; serve ready <= 5 s
with RSS (without the search index) <= 24 bytes/row + 500 MB.
"""

import argparse
import http.client
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from make_checkpoint import make_checkpoint  # noqa: E402

from pnsfw.store import Store  # noqa: E402
from pnsfw.store.shards import embedding_array  # noqa: E402
from pnsfw.store.sizes import parse_size  # noqa: E402

INDEX_FACTORY = "IVF64,PQ4x4np"  # cheap to build and small in memory: serve's RSS is the bookkeeping
NEW_FILES = 1000
MODEL = "bench"  # a zero-shot classifier, so serve holds per-row scores
LAZY = True  # serve with MODEL: --lazy-encoder, so its RSS is the store's and the scores' (no torch)
HWM = ("import atexit, sys\n"
       "def hwm():\n"
       "    for line in open('/proc/self/status'):\n"
       "        if line.startswith('VmHWM'):\n"
       "            sys.stderr.write('VMHWM_KB ' + line.split()[1] + '\\n')\n"
       "        if line.startswith(('RssAnon', 'RssFile')):\n"
       "            sys.stderr.write(line.split(':')[0].upper() + '_KB ' + line.split()[1] + '\\n')\n"
       "    io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())\n"
       "    sys.stderr.write('RCHAR_B ' + io['rchar'] + '\\nWCHAR_B ' + io['wchar'] + '\\n')\n"
       "atexit.register(hwm)\n"
       "sys.argv = ['pnsfw'] + sys.argv[1:]\n"
       "from pnsfw.cli import cli\n"
       "cli()\n")
OPEN = ("import sys, time\n"
        "from pnsfw.store import Store\n"
        "t = time.perf_counter(); s = Store.open(sys.argv[1]); first = time.perf_counter() - t\n"
        "t = time.perf_counter(); s = Store.open(sys.argv[1]); print(first, time.perf_counter() - t, s.rows)\n")
LOOKUP = ("import json, sys, time\n"
          "import numpy as np\n"
          "from pnsfw.store import Store\n"
          "s = Store.open(sys.argv[1]); ids = json.loads(sys.argv[2])\n"
          "t = time.perf_counter(); s.lookup([ids.pop()]); out = {'first': time.perf_counter() - t}\n"
          "for mode in ('cold', 'warm'):\n"
          "    times = []\n"
          "    for i in ids:\n"
          "        t = time.perf_counter(); s.lookup([i]); times.append(time.perf_counter() - t)\n"
          "    out[mode] = times\n"
          "t = time.perf_counter(); s.uris_of(ids[:10]); out['uris10'] = time.perf_counter() - t\n"
          "print(json.dumps(out))\n")
REQUESTS = ("import json, sys\n"  # S3 requests per step, from the server's own counters (tests/s3_server.py)
            "from s3_server import request_delta, s3_requests\n"
            "from pnsfw.store import Store\n"
            "port, ids, out, held = int(sys.argv[3]), json.loads(sys.argv[2]), {}, {}\n"
            "def step(name, run):\n"
            "    before = s3_requests(port); run(); out[name] = request_delta(before, s3_requests(port))\n"
            "step('open', lambda: held.update(s=Store.open(sys.argv[1])))\n"
            "s = held['s']\n"
            "step('lookup_first', lambda: s.lookup([ids[0]]))\n"
            "step('lookup_other_shard', lambda: s.lookup([ids[1]]))\n"
            "step('lookup_again', lambda: s.lookup([ids[1]]))\n"
            "step('vector_of', lambda: s.vectors_of([ids[2]]))\n"
            "step('uris_of_10', lambda: s.uris_of(ids[3:13]))\n"
            "step('open_again', lambda: Store.open(sys.argv[1]))\n"
            "print(json.dumps(out))\n")


def synthetic(writer: Any, count: int, rng: np.random.Generator) -> pa.Table:
    ids = writer.next_ids(count)
    vectors = rng.standard_normal((count, 256), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    hexes = [f"{h:016x}" for h in rng.integers(0, 2**63, count)]
    uris = [f"https://images.example-cdn.com/photos/{h[:2]}/{h[2:4]}/{h}.jpg" for h in hexes]
    return pa.table({"id": ids, "uri": uris, "source": ["s3://corpus/part-0001.parquet"] * count,
                     "sha256": [""] * count, "width": pa.array(np.full(count, 512, np.int32)),
                     "height": pa.array(np.full(count, 384, np.int32)),
                     "embedding": embedding_array(vectors.astype(np.float16)),
                     "caption": [f"a photo {h[:6]}" for h in hexes]})


def grow(root: Path, rows: int, shard: int, space: tuple[dict[str, Any], Any]) -> float:
    """Append synthetic shards until the store holds `rows`; the seconds it took."""
    started = time.perf_counter()
    store = Store(root)
    rng = np.random.default_rng(store.rows)
    with store.writer() as writer:
        if writer.manifest.space is None:
            writer.set_space(*space)
        while writer.manifest.next_id < rows:
            count = [min(shard, rows - writer.manifest.next_id - i * shard) for i in range(4)]
            writer.commit_shards([synthetic(writer, c, rng) for c in count if c > 0], threads=2)
            print(f"[bench] {writer.manifest.next_id:,} rows", flush=True)
    return time.perf_counter() - started


def child(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env=env or dict(os.environ, PYTHONPATH=str(ROOT)))


def open_seconds(root: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """Median of 3 fresh processes: the first open (file system set-up included) and a second one."""
    runs = [child(OPEN, root, env=env).stdout.split() for _ in range(3)]
    return {"first_s": round(statistics.median(float(r[0]) for r in runs), 4),
            "again_s": round(statistics.median(float(r[1]) for r in runs), 4)}


def info_seconds(root: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pnsfw.cli", "info", "--store", root, "--json"], check=True,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - started


def make_images(folder: Path, count: int, seed: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{seed}-{i:05d}.png")
    return folder


def index_peak_mb(root: "Path | str", images: Path, checkpoint: Path, env: dict[str, str] | None = None,
                  faiss: bool = False) -> dict[str, float]:
    """Peak RSS (MB), private and file-backed RSS at exit (MB) and seconds of `pnsfw index` (--no-faiss unless
    `faiss`) adding the images to the store."""
    started = time.perf_counter()
    done = child(HWM, "index", str(images), "--store", str(root), "--model", str(checkpoint), "--device", "cpu",
                 "--workers", "1", *([] if faiss else ["--no-faiss"]), env=env)
    kb = {line.split()[0]: int(line.split()[1]) for line in done.stderr.splitlines()
          if line.split()[:1] in (["VMHWM_KB"], ["RSSANON_KB"], ["RSSFILE_KB"], ["RCHAR_B"], ["WCHAR_B"])}
    return {"peak_rss_mb": round(kb["VMHWM_KB"] / 1024, 1), "anon_mb": round(kb["RSSANON_KB"] / 1024, 1),
            "file_mb": round(kb["RSSFILE_KB"] / 1024, 1), "seconds": round(time.perf_counter() - started, 1),
            "read_mb": round(kb.get("RCHAR_B", 0) / 2**20, 1), "written_mb": round(kb.get("WCHAR_B", 0) / 2**20, 1)}


def bookkeeping_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "_manifest").rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def settled_rss_mb(pid: int, seconds: float = 60.0) -> float:
    """VmRSS once it has not grown for 3 s (the background loads of serve done), at most `seconds`."""
    deadline, last, since = time.monotonic() + seconds, rss_mb(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 3:
        time.sleep(0.25)
        now = rss_mb(pid)
        if now > last + 1:
            last, since = now, time.monotonic()
    return rss_mb(pid)


def serve(root: "Path | str", ids: list[int], log: Path, index_mb: float, model: str | None = None,
          env: dict[str, str] | None = None, lazy: bool = False, counter: "Counter | None" = None) -> dict[str, Any]:
    """One `pnsfw serve` (MODEL or none): time to /health; RSS there (total, private, and total minus the FAISS
    index file); item / search-by-id latency (ms); RSS once the background loads (CLIP encoder, bulk scores)
    are done. `counter`: also the S3 requests per item and per search request."""
    port = free_port()
    cmd = [sys.executable, "-m", "pnsfw.cli", "serve", "--store", str(root), "--port", str(port), "--device", "cpu",
           "--search", "index", "--log-level", "warning", *(["--model", model] if model else []),
           *(["--lazy-encoder"] if lazy else [])]
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=env or dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        conn = _wait_health(port, proc, log)
        ready = time.perf_counter() - started
        rss, anon = rss_mb(proc.pid), rss_mb(proc.pid, "RssAnon")
        settled = settled_rss_mb(proc.pid)  # the background loads done, no request yet
        settled_anon = rss_mb(proc.pid, "RssAnon")
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # the idle one is past keep-alive
        counts = counter.read() if counter else {}
        items = [_timed(conn, "GET", f"/v1/items/{i}") for i in ids]
        counts_items = counter.read() if counter else {}
        search = [_timed(conn, "POST", "/v1/search", json.dumps({"id": i, "k": 10})) for i in ids[:50]]
        requests = {} if counter is None else {
            "requests_per_item": counter.per(counts, counts_items, len(ids)),
            "requests_per_search": counter.per(counts_items, counter.read(), len(ids[:50]))}
        return {**requests, "ready_s": round(ready, 2), "rss_mb": round(rss, 1), "anon_mb": round(anon, 1),
                "rss_without_index_mb": round(rss - index_mb, 1), "rss_settled_mb": round(settled, 1),
                "settled_anon_mb": round(settled_anon, 1), "item_ms": _summary(items),
                "search_id_ms": _summary(search), "rss_after_requests_mb": round(rss_mb(proc.pid), 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_health(port: int, proc: subprocess.Popen, log: Path) -> http.client.HTTPConnection:
    for _ in range(6000):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/health")
            if conn.getresponse().read() and True:
                return conn
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited:\n{log.read_text(errors='replace')[-3000:]}") from None
        time.sleep(0.05)
    raise SystemExit("serve did not become ready")


def _timed(conn: http.client.HTTPConnection, method: str, path: str, body: str | None = None) -> float:
    started = time.perf_counter()
    conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{method} {path}: HTTP {response.status}")
    return (time.perf_counter() - started) * 1000


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(ordered[len(ordered) // 2], 2), "p99": round(ordered[int(len(ordered) * 0.99)], 2),
            "mean": round(float(np.mean(values)), 2), "n": len(values)}


class Counter:
    """S3 requests through the SeaweedFS server's metrics (all processes: the bench's children included)."""

    def __init__(self, port: int):
        self.port = port

    def read(self) -> dict[str, int]:
        from s3_server import s3_requests

        return s3_requests(self.port)

    def per(self, before: dict[str, int], after: dict[str, int], count: int) -> dict[str, float]:
        from s3_server import request_delta

        return {k: round(v / count, 2) for k, v in request_delta(before, after).items()}

    def around(self, run: Any) -> tuple[Any, dict[str, int]]:
        from s3_server import request_delta

        before = self.read()
        value = run()
        return value, request_delta(before, self.read())


def lookups(root: str, ids: list[int], env: dict[str, str] | None = None) -> dict[str, Any]:
    data = json.loads(child(LOOKUP, root, json.dumps(ids), env=env).stdout)
    return {"first_ms": round(data["first"] * 1000, 2), "cold_ms": _summary([t * 1000 for t in data["cold"]]),
            "warm_ms": _summary([t * 1000 for t in data["warm"]]), "uris_of_10_ms": round(data["uris10"] * 1000, 2)}


def spread_ids(rows: int, count: int, seed: int) -> list[int]:
    """Random ids, one per stretch of rows."""
    edges = np.linspace(0, rows, count + 1).astype(np.int64)
    rng = np.random.default_rng(seed)
    return [int(rng.integers(a, b)) for a, b in itertools.pairwise(edges)]


def group_ids(root: str, count: int, seed: int) -> list[int]:
    """One random id in each of `count` row groups spread over the store (+1 for the untimed first lookup), so
    every cold lookup reads a row group it has not read before."""
    import pyarrow.parquet as pq

    store, rng = Store.open(root), np.random.default_rng(seed)
    picked = [store.shards[int(i)] for i in np.linspace(0, len(store.shards) - 1, min(count + 1, len(store.shards)))]
    ids = []
    for shard in picked:
        meta = pq.ParquetFile(store.fs.open_input(f"shards/{shard.name}")).metadata
        group = int(rng.integers(meta.num_row_groups))
        start = sum(meta.row_group(g).num_rows for g in range(group))
        ids.append(shard.min_id + start + int(rng.integers(meta.row_group(group).num_rows)))
    return sorted(set(ids))


def ensure_index(root: Path) -> dict[str, Any]:
    """A cheap IVF-PQ index covering the store (built once, then updated with new shards)."""
    from pnsfw.search.index import build_index, read_meta, update_index

    store = Store.open(root)
    with store.writer():
        return update_index(store) if read_meta(store) else build_index(store, INDEX_FACTORY)


def cli_run(*args: str, env: dict[str, str] | None = None) -> float:
    """Seconds of one `pnsfw ARGS...` process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pnsfw.cli", *args], check=True, capture_output=True,
                   env=env or dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - started


def ensure_model(root: Path, work: Path, checkpoint: Path) -> None:
    """A zero-shot classifier MODEL (two concepts, the tiny CLIP's text tower): weights only, no training run."""
    if (root / "models").is_dir() and any((root / "models").glob(f"{MODEL}*")):
        return
    concepts = work / "concepts.txt"
    concepts.write_text("nsfw: an explicit photo\nsfw: a photo of a landscape\n")
    cli_run("train", "--store", str(root), "--zero-shot", str(concepts), "--name", MODEL, "--clip-model",
            str(checkpoint), "--device", "cpu")


def score(root: "Path | str", env: dict[str, str] | None = None) -> dict[str, Any]:
    """`pnsfw score` of the rows not scored yet: rows, seconds (whole process), vectors/s."""
    before = Store.open(root).scores(MODEL).state()
    done = {} if before is None else before.shards
    todo = sum(s.rows for s in Store.open(root).shards if s.name not in done)
    seconds = cli_run("score", "--store", str(root), "--model", MODEL, "--device", "cpu", env=env)
    return {"rows": todo, "seconds": round(seconds, 1), "vectors_per_s": round(todo / seconds)}


def index_file_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in (root / "index").rglob("*faiss*") if p.is_file()) / 2**20


def measure(root: Path, images: Path, checkpoint: Path, baseline: dict[str, float], log: Path) -> dict[str, Any]:
    store = Store.open(root)
    rows = store.rows
    shard_bytes = sum(s.bytes for s in store.shards)
    result: dict[str, Any] = {"rows": rows, "shards": len(store.shards), "manifest_format": store.manifest.format}
    result["open_s"] = open_seconds(str(root))
    result["info_s"] = info_seconds(str(root))
    index = index_peak_mb(root, images, checkpoint)
    result["index"] = dict(index, bytes_per_row_over_empty=round((index["peak_rss_mb"] - baseline["peak_rss_mb"])
                                                                 * 2**20 / rows, 2),
                           target_mb=round((16 * rows) / 2**20 + 300, 1))
    result["disk"] = {"shard_bytes_per_row": round(shard_bytes / rows, 1),
                      "bookkeeping_bytes_per_row": round(bookkeeping_bytes(root) / rows, 3)}
    result["lookup_local"] = lookups(str(root), group_ids(str(root), 100, 1))
    index_mb = index_file_mb(root)
    ids = spread_ids(rows, 200, 2)
    result["search_index_mb"] = round(index_mb, 1)
    result["serve"] = serve(root, ids, log, index_mb)
    result["serve_model"] = serve(root, ids, log, index_mb, MODEL, lazy=LAZY)
    result["serve_target_mb"] = round(24 * rows / 2**20 + 500, 1)
    return result


def same_commands(url: "Path | str", work: Path, checkpoint: Path, index_mb: float, tag: str,
                  env: dict[str, str] | None = None, counter: "Counter | None" = None) -> dict[str, Any]:
    """On a scoreless copy of the store: `score` of every row, `index` of 1,000 new files, then a serve
    (`counter`: with the S3 requests each made)."""
    rows = Store.open(url).rows
    images = make_images(work / f"images-{tag}-{time.time_ns()}", NEW_FILES, 99)
    counted = counter.around if counter else lambda run: (run(), {})
    out: dict[str, Any] = {"rows": rows}
    out["score"], out["score_requests"] = counted(lambda: score(url, env))
    out["index"], out["index_requests"] = counted(lambda: index_peak_mb(url, images, checkpoint, env))
    out["serve"] = serve(url, spread_ids(rows, 200, 4), work / f"serve-{tag}.log", index_mb, MODEL, env, LAZY,
                         counter)
    return {k: v for k, v in out.items() if v != {}}


def s3_measure(root: Path, work: Path, checkpoint: Path) -> dict[str, Any]:
    """The store without its scores, copied once to a local folder and once to a SeaweedFS bucket
    (tests/s3_server.py); on each the same commands (same_commands), and open and lookup on S3."""
    import shutil

    import s3fs
    from s3_server import start_seaweed

    local = work / "copy"
    shutil.rmtree(local, ignore_errors=True)
    shutil.copytree(root, local, ignore=lambda folder, names: ["scores"] if Path(folder) == root else [])
    metrics = free_port()
    server = start_seaweed(work / f"seaweed-{time.time_ns()}", metrics)
    endpoint = next(server)
    counter = Counter(metrics)
    env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ENDPOINT_URL=endpoint)
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # this process's Store.open(url) too
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("bench")
        started = time.perf_counter()
        for entry in local.iterdir():
            fs.put(str(entry), f"bench/store/{entry.name}", recursive=entry.is_dir())
        url = "s3://bench/store"
        out: dict[str, Any] = {"upload_s": round(time.perf_counter() - started, 1), "open_s": open_seconds(url, env),
                               "lookup": lookups(url, group_ids(str(root), 30, 3), env)}
        out["requests"] = json.loads(child(REQUESTS, url, json.dumps(group_ids(str(root), 13, 5)), str(metrics),
                                           env=dict(env, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")).stdout)
        out["s3"] = same_commands(url, work, checkpoint, index_file_mb(root), "s3", env, counter)
        out["local"] = same_commands(local, work, checkpoint, index_file_mb(root), "local")
        out["relative_to_local"] = relative(out["s3"], out["local"])
        return out
    finally:
        os.environ.pop("AWS_ENDPOINT_URL")
        next(server, None)
        shutil.rmtree(local, ignore_errors=True)


def relative(s3: dict[str, Any], local: dict[str, Any]) -> dict[str, float]:
    """S3 throughput as a fraction of local disk's (1.0: the same; 0.5: half as fast)."""
    return {"score_vectors_per_s": round(s3["score"]["vectors_per_s"] / local["score"]["vectors_per_s"], 3),
            "index_files_per_s": round(local["index"]["seconds"] / s3["index"]["seconds"], 3),
            "search_id_per_s_p50": round(local["serve"]["search_id_ms"]["p50"] / s3["serve"]["search_id_ms"]["p50"], 3),
            "item_per_s_p50": round(local["serve"]["item_ms"]["p50"] / s3["serve"]["item_ms"]["p50"], 3)}


def extrapolate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-row slopes between the two largest sizes and what they give at 1B rows."""
    if len(results) < 2:
        return {}
    a, b = sorted(results, key=lambda r: r["rows"])[-2:]
    def slope(get: Any) -> float:
        return (get(b) - get(a)) * 2**20 / (b["rows"] - a["rows"])

    out: dict[str, Any] = {"between_rows": [a["rows"], b["rows"]]}
    # serve's RSS without the FAISS index: with MODEL (--lazy-encoder) at ready and settled, and without a model
    # once the CLIP encoder loaded (its RSS at ready is taken while torch is loading: no slope of that)
    for name, get in {"index_peak": lambda r: r["index"]["peak_rss_mb"],
                      "serve_model_ready_rss": lambda r: r["serve_model"]["rss_without_index_mb"],
                      "serve_model_settled_rss": lambda r: r["serve_model"]["rss_settled_mb"] - r["search_index_mb"],
                      "serve_encoder_settled_rss": lambda r: r["serve"]["rss_settled_mb"] - r["search_index_mb"],
                      "manifest_disk": lambda r: r["disk"]["bookkeeping_bytes_per_row"] * r["rows"] / 2**20}.items():
        per_row = slope(get)
        at_1b = get(b) + per_row * (10**9 - b["rows"]) / 2**20
        out[name] = {"bytes_per_row": round(per_row, 2), "at_1b_gb": round(at_1b / 1024, 2)}
    return out


def machine() -> dict[str, Any]:
    import faiss
    import pyarrow

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
                                                                      * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
            "numpy": np.__version__, "pyarrow": pyarrow.__version__, "faiss": faiss.__version__,
            "note": "a shared machine: other agents may run tests and benchmarks on the same 2 cores meanwhile"}


def print_table(results: list[dict[str, Any]], s3: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    print(f"{'rows':>11} {'open s':>7} {'index MB':>9} {'(anon)':>7} {'target':>7} {'B/row':>6} "
          f"{'lookup cold/warm ms':>20} {'ready s':>8} {'MB':>6} {'+model s':>8} {'MB':>6} {'settled':>8} "
          f"{'target':>7} {'item p50':>8} {'search p50':>10} {'score v/s':>10}")
    for r in sorted(results, key=lambda r: r["rows"]):
        lk, sv, sm = r["lookup_local"], r["serve"], r["serve_model"]
        print(f"{r['rows']:>11,} {r['open_s']['first_s']:>7.3f} {r['index']['peak_rss_mb']:>9.0f} "
              f"{r['index']['anon_mb']:>7.0f} {r['index']['target_mb']:>7.0f} "
              f"{r['index']['bytes_per_row_over_empty']:>6.1f} "
              f"{lk['cold_ms']['p50']:>10.2f}/{lk['warm_ms']['p50']:<9.2f} "
              f"{sv['ready_s']:>8.2f} {sv['rss_without_index_mb']:>6.0f} {sm['ready_s']:>8.2f} "
              f"{sm['rss_without_index_mb']:>6.0f} {sm['rss_settled_mb'] - r['search_index_mb']:>8.0f} "
              f"{r['serve_target_mb']:>7.0f} {sm['item_ms']['p50']:>8.1f} {sm['search_id_ms']['p50']:>10.1f} "
              f"{r['score']['vectors_per_s']:>10,}")
    for name, value in extra.items():
        if name != "between_rows":
            print(f"slope {name}: {value['bytes_per_row']} B/row -> {value['at_1b_gb']} GB at 1B rows")
    if s3:
        print(f"S3 (SeaweedFS, {s3['s3']['rows']:,} rows): open {s3['open_s']['first_s']:.3f} s, lookup cold p50 "
              f"{s3['lookup']['cold_ms']['p50']:.1f} ms; relative to local disk: {s3['relative_to_local']}")


SEARCH = ("import json, sys, time\n"
          "import numpy as np\n"
          "from pnsfw.store import Store\n"
          "from pnsfw.search import index as ix\n"
          "from pnsfw.search.query import Searcher\n"
          "def rss():\n"
          "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024\n"
          "store, merge = Store.open(sys.argv[1]), sys.argv[2] == 'merge'\n"
          "segments = len((ix.read_meta(store) or {}).get('segments') or [1])\n"
          "if not merge:\n"
          "    ix.MERGE_AT_LOAD = False\n"
          "before = rss(); t = time.perf_counter(); s = Searcher.open(store); load = time.perf_counter() - t\n"
          "rng = np.random.default_rng(5); q = rng.standard_normal((201, store.dim)).astype(np.float32)\n"
          "s.search_arrays(q[:1], 10); times = []\n"
          "for v in q[1:]:\n"
          "    t = time.perf_counter(); s.search_arrays(v[None], 10); times.append(time.perf_counter() - t)\n"
          "print(json.dumps({'segments': segments, 'index': type(s.index).__name__, 'load_s': load,\n"
          "                  'rss_mb': rss() - before, 'times': times}))\n")


def search_p50(root: Path, merge: bool = True) -> dict[str, Any]:
    """A fresh process: Searcher.open (the FAISS index loaded; segments merged at load unless not `merge`), then
    200 single-vector searches (k=10): load seconds, RSS the load added, latency."""
    data = json.loads(child(SEARCH, str(root), "merge" if merge else "shards").stdout)
    return {"segments": data["segments"], "index": data["index"], "load_s": round(data["load_s"], 3),
            "rss_mb": round(data["rss_mb"], 1), "search_ms": _summary([t * 1000 for t in data["times"]])}


def faiss_measure(root: Path, work: Path, checkpoint: Path, factory: str, updates: int, tag: str) -> dict[str, Any]:
    """A real index of FACTORY over the store (built once, untimed here), searched with one generation as
    built; then `updates` runs of `pnsfw index` of 1,000 new files each WITH the FAISS update (peak RSS, bytes
    read and written, seconds), and the search again."""
    from pnsfw.search.index import build_index, read_meta

    store = Store.open(root)
    out: dict[str, Any] = {"rows": store.rows, "factory": factory}
    started = time.perf_counter()
    with store.writer():
        meta = read_meta(store)
        if meta is None or meta.get("spec") != factory or set(meta["shards"]) != {s.name for s in store.shards}:
            build_index(store, factory)
    out["build_s"] = round(time.perf_counter() - started, 1)
    out["index_file_mb"] = round(index_file_mb(root), 1)
    out["search_built"] = search_p50(root)
    out["updates"] = []
    for n in range(updates):
        images = make_images(work / f"images-{tag}-{store.rows}-{n}-{time.time_ns()}", NEW_FILES, 100 + n)
        out["updates"].append(index_peak_mb(root, images, checkpoint, faiss=True))
        print(f"[bench] update {n + 1}: {out['updates'][-1]}", flush=True)
    out["search_updated"] = search_p50(root)
    if out["search_updated"]["segments"] > 1:
        out["search_updated_per_segment"] = search_p50(root, merge=False)
    out["index_files_mb_after"] = round(index_file_mb(root), 1)
    return out


def faiss_main(args: argparse.Namespace) -> None:
    """--faiss FACTORY: per size, the store grown, a real index, incremental updates and searches (faiss_measure);
    results under runs[--label] in --out (other labels kept)."""
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.projection import random_projection

    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint("tiny", work / "tiny-clip.pt")
    encoder = load_encoder(str(checkpoint), "cpu", "fp32")
    space = (encoder.describe(), random_projection(encoder.width))
    data = json.loads(out.read_text()) if out.is_file() else {}
    runs = data.setdefault("runs", {})
    run = runs.setdefault(args.label, {"machine": machine(), "sizes": []})
    for rows in (parse_size(r) for r in args.rows.split(",")):
        built = grow(work / "store", rows, parse_size(args.shard_size), space)
        result = dict(faiss_measure(work / "store", work, checkpoint, args.faiss, args.updates, args.label),
                      write_s=round(built, 1), load_average_at_start=os.getloadavg())
        print(json.dumps(result), flush=True)
        run["sizes"] = [r for r in run["sizes"] if r["rows"] != result["rows"]] + [result]
        out.write_text(json.dumps(data, indent=1) + "\n")
    for r in run["sizes"]:
        last = r["updates"][-1]
        print(f"{args.label} {r['rows']:>11,} rows: index update peak {last['peak_rss_mb']:.0f} MB, read "
              f"{last['read_mb']:.0f} MB, wrote {last['written_mb']:.0f} MB, {last['seconds']} s; search p50 "
              f"{r['search_built']['search_ms']['p50']} ms (1 segment) vs {r['search_updated']['search_ms']['p50']} "
              f"ms ({r['search_updated']['segments']} segments)")


def merged(out: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's sizes plus the other sizes of an earlier run in OUT (a 20M run can then be its own run)."""
    if not out.is_file():
        return results
    fresh = {r["rows"] for r in results}
    kept = [r for r in json.loads(out.read_text()).get("sizes", []) if r["rows"] not in fresh and "serve_model" in r]
    return sorted(kept + results, key=lambda r: r["rows"])


def prepared(work: Path, rows: int, shard: int) -> tuple[Path, Path]:
    """The tiny CLIP checkpoint and the bench store grown to `rows`, with its index, MODEL and scores."""
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.projection import random_projection

    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint("tiny", work / "tiny-clip.pt")
    root = work / "store"
    if not root.is_dir() or Store.open(root).rows < rows:
        encoder = load_encoder(str(checkpoint), "cpu", "fp32")
        grow(root, rows, shard, (encoder.describe(), random_projection(encoder.width)))
        ensure_index(root)
    ensure_model(root, work, checkpoint)
    score(root)
    return checkpoint, root


def s3_only(work: Path, out: Path, rows: int, shard: int, key: str) -> None:
    """The S3 comparison alone (s3_measure) at `rows`, stored in OUT under KEY beside what OUT holds."""
    info = machine()
    checkpoint, root = prepared(work, rows, shard)
    result = dict(s3_measure(root, work, checkpoint), machine=info)
    print(json.dumps(result), flush=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps(dict(data, **{key: result}), indent=1) + "\n")
    print(f"S3 (SeaweedFS, {result['s3']['rows']:,} rows): open {result['open_s']['first_s']:.3f} s, lookup cold "
          f"p50 {result['lookup']['cold_ms']['p50']:.1f} ms; relative to local disk: {result['relative_to_local']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1M,5M,20M")
    parser.add_argument("--shard-size", default="50k")
    parser.add_argument("--s3-rows", default="1M", help="the size also measured on S3 (none: skip)")
    parser.add_argument("--workdir", default="/tmp/pnsfw-bench-scale")
    parser.add_argument("--out", default=None)
    parser.add_argument("--faiss", default=None, metavar="FACTORY",
                        help="measure a real FAISS index of FACTORY instead (incremental updates, search)")
    parser.add_argument("--updates", type=int, default=3, help="with --faiss: index runs of 1,000 files each")
    parser.add_argument("--label", default="after", help="with --faiss: the run's name in --out")
    parser.add_argument("--s3-only", metavar="KEY", help="only the S3 comparison at --s3-rows (the store grown to "
                        "that size, indexed, modelled and scored if it is not yet), kept in --out under KEY")
    args = parser.parse_args()
    if args.faiss:
        args.out = args.out or str(ROOT / "docs" / "bench_store_segments.json")
        return faiss_main(args)
    args.out = args.out or str(ROOT / "docs" / "bench_store_scale.json")
    if args.s3_only:
        s3_only(Path(args.workdir), Path(args.out), parse_size(args.s3_rows), parse_size(args.shard_size),
                args.s3_only)
        return
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.projection import random_projection

    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint("tiny", work / "tiny-clip.pt")
    encoder = load_encoder(str(checkpoint), "cpu", "fp32")
    space = (encoder.describe(), random_projection(encoder.width))
    info = machine()
    baseline = index_peak_mb(work / f"empty-{time.time_ns()}", make_images(work / "images-empty", NEW_FILES, 0),
                             checkpoint)
    results: list[dict[str, Any]] = []
    s3 = json.loads(out.read_text()).get("s3") if out.is_file() else None
    for n, rows in enumerate(parse_size(r) for r in args.rows.split(",")):
        built = grow(work / "store", rows, parse_size(args.shard_size), space)
        print(f"[bench] {rows:,} rows written in {built:.0f} s; index: {ensure_index(work / 'store')}", flush=True)
        ensure_model(work / "store", work, checkpoint)
        scored = score(work / "store")
        images = make_images(work / f"images-{rows}-{time.time_ns()}", NEW_FILES, n + 1)
        results.append(dict(measure(work / "store", images, checkpoint, baseline, work / "serve.log"),
                            write_s=round(built, 1), score=scored))
        print(json.dumps(results[-1]), flush=True)
        if args.s3_rows != "none" and rows == parse_size(args.s3_rows):
            s3 = s3_measure(work / "store", work, checkpoint)
            print(json.dumps(s3), flush=True)
    results = merged(out, results)
    extra = extrapolate(results)
    print_table(results, s3, extra)
    out.write_text(json.dumps({"machine": info, "index_baseline_empty_store": baseline, "new_files": NEW_FILES,
                               "index_factory": INDEX_FACTORY, "shard_size": parse_size(args.shard_size),
                               "sizes": results, "extrapolation": extra, "s3": s3}, indent=1) + "\n")


if __name__ == "__main__":
    main()
