"""A folder's listing alone and beside a thread importing torch: in this process (walk_here) against a child
process (walk_files). Prints a table, writes JSON.

    python scripts/bench_listing.py --files 100000 --out listing.json   # makes DIR/flat of empty files first
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

_RUN = r"""
import json, sys, threading, time
from pnsfw.indexer.walk import walk_files, walk_here
walk, root, beside = {"here": walk_here, "child": walk_files}[sys.argv[1]], sys.argv[2], sys.argv[3] == "1"
t0, done = time.perf_counter(), {}
def imp():
    import torch  # noqa: F401
    done["torch_s"] = time.perf_counter() - t0
thread = threading.Thread(target=imp)
if beside:
    thread.start()
first, n = None, 0
for _ in walk(root):
    first = time.perf_counter() - t0 if first is None else first
    n += 1
listed = time.perf_counter() - t0
if not beside:
    thread.start()
thread.join()
print(json.dumps({"names": n, "first_s": first, "listed_s": listed, "torch_s": done["torch_s"]}))
"""


def make_folder(root: Path, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if len(os.listdir(root)) != count:
        for i in range(count):
            os.close(os.open(root / f"{i:08d}.jpg", os.O_CREAT | os.O_WRONLY))


def one_run(walk: str, root: Path, beside: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN, walk, str(root), "1" if beside else "0"], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/pnsfw-listing"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("listing.json"))
    args = ap.parse_args()
    root = args.dir / f"flat{args.files}"
    make_folder(root, args.files)
    rows = [dict(walk=walk, beside_import=beside, **one_run(walk, root, beside))
            for _ in range(args.repeats) for beside in (False, True) for walk in ("here", "child")]
    print(f"{'walk':6} {'beside torch import':20} {'first name s':>12} {'all listed s':>12} {'torch imported s':>16}")
    for row in rows:
        print(f"{row['walk']:6} {row['beside_import']!s:20} {row['first_s']:12.3f} {row['listed_s']:12.3f} "
              f"{row['torch_s']:16.2f}")
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.write_text(json.dumps({"machine": machine, "files": args.files, "runs": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
