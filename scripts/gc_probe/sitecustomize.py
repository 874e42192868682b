"""A probe of the cyclic collector's pauses in another process, put on its PYTHONPATH (docs/benchmarks.md).

    PYTHONPATH=scripts/gc_probe .venv/bin/python scripts/bench_api.py --vectors 100k --device cpu --seconds 10

Active in a process whose argv names `serve`, or in every process with GCPROBE_ALL=1 (Ray's workers, an
in-process import). Every 2 s it rewrites /tmp/gcprobe/out.PID.txt: the process's argv, then per generation the
collections, their total and longest seconds, then each full collection and each pause over 10 ms with its time
since the probe started. A file rewritten in a loop, as `pnsfw serve` ends by a signal without atexit handlers.
"""

import gc
import os
import sys
import threading
import time

OUT = "/tmp/gcprobe"


def _install() -> None:
    began = time.perf_counter()
    pauses: list[tuple[float, float, int]] = []
    starts: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            starts.append(time.perf_counter())
        elif starts:
            start = starts.pop()
            pauses.append((start - began, time.perf_counter() - start, info.get("generation", -1)))

    def dump() -> None:
        by: dict[int, list[float]] = {}
        for _, took, generation in pauses:
            by.setdefault(generation, []).append(took)
        lines = [" ".join(sys.argv)[:200]]
        lines += [f"gen{g}: n={len(ts)} total={sum(ts):.3f} max={max(ts):.4f}" for g, ts in sorted(by.items())]
        lines += [f"  at {at:7.2f} s gen{g} {took * 1000:.1f} ms" for at, took, g in pauses if g == 2 or took > 0.01]
        with open(os.path.join(OUT, f"out.{os.getpid()}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def loop() -> None:
        while True:
            time.sleep(2)
            dump()

    os.makedirs(OUT, exist_ok=True)
    gc.callbacks.append(callback)
    threading.Thread(target=loop, name="gc-probe", daemon=True).start()


if "serve" in sys.argv or os.environ.get("GCPROBE_ALL"):
    _install()
