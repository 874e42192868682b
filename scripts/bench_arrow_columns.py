#!/usr/bin/env python
"""What the writer's columns cost: pyarrow's `pa.array` against pnsfw's builders (store.shards.string_array,
number_array), and the pandas import that the first `pa.array` of a process triggers, with and without bytecode.

Each import is timed in a fresh interpreter: `import pyarrow`, then the first conversion, as the writer thread
meets it. "no bytecode" runs with PYTHONDONTWRITEBYTECODE=1 and an empty PYTHONPYCACHEPREFIX, so every module is
compiled from source, as on the GPU device image (docs/benchmarks.md, GPU round 15).

Example::

    python scripts/bench_arrow_columns.py --rows 1024 --repeats 5 --out arrow_columns.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIRST_CALL = """
import sys, time
import pyarrow as pa
sys.path.insert(0, {root!r})
from pnsfw.store.shards import string_array
started = time.perf_counter()
{call}
print(time.perf_counter() - started, "pandas" in sys.modules)
"""
CALLS = {"pa.array": 'pa.array(["a/b.jpg"] * 4, pa.string())', "string_array": 'string_array(["a/b.jpg"] * 4)'}


def first_call(name: str, bytecode: bool) -> tuple[float, bool]:
    """Seconds of a fresh process's first conversion by `name`, and whether it imported pandas."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty:
        if not bytecode:
            env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=empty)
        code = FIRST_CALL.format(root=str(ROOT), call=CALLS[name])
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds, pandas = out.stdout.split()
    return float(seconds), pandas == "True"


def per_batch_ms(rows: int, repeats: int) -> dict[str, float]:
    """Milliseconds to build one batch's uri column and its width column, each way (best of `repeats`)."""
    import numpy as np
    import pyarrow as pa

    from pnsfw.store.shards import number_array, string_array

    uris, widths = [f"/data/images/{i:09d}.jpg" for i in range(rows)], [256] * rows
    def builder() -> pa.Array:
        strings = pa.lib.StringBuilder()
        strings.append_values(uris)
        return strings.finish()

    ways = {"pa.array strings": lambda: pa.array(uris, pa.string()), "string_array": lambda: string_array(uris),
            "pa.lib.StringBuilder": builder,
            "pa.array int32": lambda: pa.array(widths, pa.int32()),
            "number_array int32": lambda: number_array(widths, pa.int32())}
    best = {}
    for name, way in ways.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(100):
                way()
            times.append((time.perf_counter() - started) * 10)  # ms a call
        best[name] = float(np.min(times))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="rows of a batch (the GPU path's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("arrow_columns.json"))
    args = parser.parse_args()
    imports: list[dict[str, Any]] = []
    for bytecode in (True, False):
        for name in CALLS:
            runs = [first_call(name, bytecode) for _ in range(args.repeats)]
            imports.append({"call": name, "bytecode": bytecode, "seconds": [s for s, _ in runs],
                            "imported_pandas": any(p for _, p in runs)})
    batch = per_batch_ms(args.rows, args.repeats)
    print(f"{'first call of a process':<26} {'bytecode':>9} {'s (min-max)':>14} {'pandas imported':>16}")
    for row in imports:
        spread = f"{min(row['seconds']):.3f}-{max(row['seconds']):.3f}"
        print(f"{row['call']:<26} {row['bytecode']!s:>9} {spread:>14} {row['imported_pandas']!s:>16}")
    print(f"\n{'one batch of ' + str(args.rows) + ' rows':<26} {'ms (best)':>9}")
    for name, ms in batch.items():
        print(f"{name:<26} {ms:>9.3f}")
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
               "pyarrow": metadata.version("pyarrow"), "numpy": metadata.version("numpy")}
    try:
        machine["pandas"] = metadata.version("pandas")
    except metadata.PackageNotFoundError:
        pass
    args.out.write_text(json.dumps({"machine": machine, "rows": args.rows, "first_call": imports,
                                    "batch_ms": batch}, indent=1))


if __name__ == "__main__":
    main()
