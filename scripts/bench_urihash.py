"""Measure uri_hash of Arrow columns: hashlib one uri at a time against urihash's numpy lanes, on 1..N threads.

Usage: python scripts/bench_urihash.py [--uris 65536] [--columns 8] [--threads 1,2,4,8] [--lanes 4096,8192,16384]
                                       [--out bench_urihash.json]

Each thread hashes --columns columns of --uris clip-retrieval-like uris (`https://example.com/images/N.jpg`,
41 bytes); reports million uris/s over all threads (wall) and CPU us a uri. For the lanes also the GIL they
hold per uri: numpy's call overhead, measured as the time to hash 16 lanes (numpy keeps the GIL for operations
of <= 500 elements, and the work of 16 lanes is nil) over the lanes of one call. A probe thread counting in
Python beside the hashing was tried and dropped: it forces GIL hand-offs at the switch interval and measured
the convoy, not the hashing.
"""

import argparse
import json
import os
import threading
import time

import pyarrow as pa


def lanes_overhead_s(repeat: int = 20) -> float:
    """Seconds of one 1-block hash call of 16 lanes: numpy's call overhead, the GIL held throughout."""
    import numpy as np

    from pnsfw.store import urihash

    data = np.frombuffer(b"x" * 41 * 16 + bytes(128), np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(data, urihash.BLOCK)
    starts, lengths, state = np.arange(16) * 41, np.full(16, 41), urihash._State(16)
    best = 1e9
    for _ in range(repeat):
        start = time.perf_counter()
        urihash._hash_group(windows, starts, lengths, 1, state)
        best = min(best, time.perf_counter() - start)
    return best


def measure(hash_one: object, columns: list[pa.Array], threads: int) -> dict[str, float]:
    def work() -> None:
        for column in columns:
            hash_one(column)  # type: ignore[operator]

    workers = [threading.Thread(target=work) for _ in range(threads)]
    wall, cpu = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    uris = threads * sum(len(c) for c in columns)
    return {"threads": threads, "m_uris_per_s": round(uris / wall / 1e6, 3), "cpu_us": round(cpu / uris * 1e6, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uris", type=int, default=65_536)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--lanes", default="4096,8192,16384")
    parser.add_argument("--out", default="bench_urihash.json")
    args = parser.parse_args()
    from pnsfw.store import urihash
    from pnsfw.store.shards import uri_hash

    columns = [pa.array([f"https://example.com/images/{i:09d}.jpg" for i in range(k * args.uris, (k + 1) * args.uris)])
               for k in range(args.columns)]
    kinds = {"hashlib": (lambda c: uri_hash(c, lanes=False), None)}
    for lanes in [int(v) for v in args.lanes.split(",")]:
        kinds[f"lanes {lanes}"] = (lambda c: uri_hash(c, lanes=True), lanes)
    overhead = lanes_overhead_s()
    results = []
    for name, (hash_one, lanes) in kinds.items():
        urihash.LANES = lanes or urihash.LANES
        hash_one(columns[0])  # warm: the thread's lanes, numpy's caches
        gil = overhead / lanes * 1e6 if lanes else None
        row = {"kind": name, "gil_us_per_uri": round(gil, 3) if gil else "all", "runs": []}
        for threads in [int(v) for v in args.threads.split(",")]:
            row["runs"].append(measure(hash_one, columns, threads))
        results.append(row)
        runs = "  ".join(f"{r['threads']}t {r['m_uris_per_s']:.2f} M/s ({r['cpu_us']} CPU us)" for r in row["runs"])
        print(f"{name:12}  GIL held {row['gil_us_per_uri']} us/uri  {runs}")
    out = {"uris": args.uris, "columns": args.columns, "cpus": os.cpu_count(), "lanes_call_16_s": overhead,
           "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
