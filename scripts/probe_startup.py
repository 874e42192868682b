#!/usr/bin/env python
"""Where each thread of a pnsfw command spends its start-up: a stack sampler inside the process (issue 13).

Runs `pnsfw ARGS...` in this interpreter with a thread that samples every thread's stack each `--interval` ms
for the first `--until` seconds, then writes, per thread, its time cut into segments of one label: the
innermost pnsfw function on the stack, and below it the module being imported or the innermost function. A
sample that came late (the sampler waited for the GIL: a C call that holds it, such as dlopen inside an
import) counts its whole wait to the stack it then found. `--importtime` adds `python -X importtime`'s
heaviest modules of `import torch` run alone (fresh processes, the first cold). Example::

    python scripts/probe_startup.py --until 9 --out startup_probe.json -- \\
        index /tmp/thumbs --store /tmp/s --model vit.pt --device cuda --no-faiss
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _label(frame: Any) -> str:
    """The innermost pnsfw function, then the outermost module imported below it (else the innermost call)."""
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    stack.reverse()  # outermost first
    ours = max((i for i, f in enumerate(stack) if "pnsfw" in f.f_code.co_filename), default=-1)
    head = stack[ours].f_code.co_name if ours >= 0 else "-"
    below = stack[ours + 1:]
    module = next((f for f in below if f.f_code.co_name == "<module>"), None)
    leaf = module or (below[-1] if below else stack[-1])
    where = "/".join(Path(leaf.f_code.co_filename).parts[-2:])
    return f"{head} > {'import ' if module else ''}{where}:{leaf.f_code.co_name}"


class Sampler(threading.Thread):
    def __init__(self, interval: float, until: float, out: Path):
        super().__init__(name="probe-sampler", daemon=True)
        self.interval, self.until, self.out = interval, until, out
        self.samples: dict[str, list[tuple[float, float, str]]] = {}
        self.late: list[float] = []

    def run(self) -> None:
        from pnsfw.indexer.timeline import since_process_start

        me = threading.get_ident()
        last = since_process_start()
        while (now := since_process_start()) < self.until:
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    self.samples.setdefault(names.get(ident, str(ident)), []).append((now, now - last,
                                                                                     _label(frame)))
            if now - last > 3 * self.interval:
                self.late.append(round(now - last, 3))
            last = now
            time.sleep(self.interval)
        self.out.write_text(json.dumps(self.report(), indent=1))

    def report(self) -> dict[str, Any]:
        threads = {}
        for name, samples in self.samples.items():
            segments: list[list[Any]] = []
            for now, took, label in samples:
                if segments and segments[-1][2] == label:
                    segments[-1][1] = round(now, 3)
                else:
                    segments.append([round(now - took, 3), round(now, 3), label])
            totals = Counter()
            for start, end, label in segments:
                totals[label] += end - start
            threads[name] = {"segments": segments,
                             "top": [[label, round(s, 3)] for label, s in totals.most_common(15)]}
        return {"interval_s": self.interval, "until_s": self.until, "late_samples_s": self.late[:200],
                "threads": threads}


def importtime(runs: int) -> list[dict[str, Any]]:
    """`import torch` in fresh interpreters: wall time and -X importtime's heaviest self and cumulative times."""
    results = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True,
                              text=True)
        wall = time.perf_counter() - started
        rows = []
        for line in done.stderr.splitlines():
            if line.startswith("import time:") and "|" in line and "self" not in line:
                own, total, name = line[len("import time:"):].split("|")
                rows.append((int(own), int(total), name.rstrip()))
        results.append({"wall_s": round(wall, 3),
                        "self_us": [[n.strip(), s] for s, _, n in sorted(rows, reverse=True)[:25]],
                        "cumulative_us": [[n, c] for _, c, n in sorted(rows, key=lambda r: -r[1])[:40]]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until", type=float, default=9.0, help="seconds after process start to sample")
    parser.add_argument("--interval", type=float, default=5.0, help="ms between samples")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--importtime", type=int, default=0, help="fresh `import torch` runs to profile first")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    if options.importtime:
        report = importtime(options.importtime)
        options.out.with_suffix(".importtime.json").write_text(json.dumps(report, indent=1))
        print("import torch alone:", [r["wall_s"] for r in report], "s", file=sys.stderr)
    if not args:
        return
    sampler = Sampler(options.interval / 1000, options.until, options.out)
    sampler.start()
    from pnsfw.cli import main as cli

    sys.argv = ["pnsfw", *args]
    try:
        cli()
    finally:
        sampler.join(timeout=max(0.0, options.until + 1))
        sys.stderr.flush()


if __name__ == "__main__":
    main()
