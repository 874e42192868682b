"""What the fixed RSS of `import torch` is made of, per interpreter (the CUDA or the CPU build of torch).

In one fresh child per `--python NAME=PATH`: numpy + pyarrow, pyarrow's first `pa.array` (it imports pandas
when pandas is installed), then torch's shared libraries one by one in the order `import torch` loads them
(libtorch_global_deps, each CUDA library that torch/__init__.py's _load_global_deps preloads and that is
installed, libtorch_cpu, libtorch_cuda, libtorch_python), then `import torch` itself (its Python modules and
operator registrations). For each step: the RSS it adds, private (anonymous and copy-on-write pages) and
file-backed, and its seconds. Prints a table and writes JSON.

    python scripts/bench_torch_rss.py --python cuda-build=.venv/bin/python --python cpu-build=/tmp/cpu/bin/python
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# torch/__init__.py `_preload_cuda_deps`, in its order (libcublasLt before libcublas)
CUDA_LIBS = [("cublasLt", "libcublasLt.so.*[0-9]"), ("cublas", "libcublas.so.*[0-9]"), ("cudnn", "libcudnn.so.*[0-9]"),
             ("nvrtc", "libnvrtc.so.*[0-9]"), ("nvrtc-builtins", "libnvrtc-builtins.so.*[0-9]"),
             ("cudart", "libcudart.so.*[0-9]"), ("cupti", "libcupti.so.*[0-9]"), ("cufft", "libcufft.so.*[0-9]"),
             ("curand", "libcurand.so.*[0-9]"), ("nvJitLink", "libnvJitLink.so.*[0-9]"),
             ("cusparse", "libcusparse.so.*[0-9]"), ("cusparseLt", "libcusparseLt.so.*[0-9]"),
             ("cusolver", "libcusolver.so.*[0-9]"), ("nccl", "libnccl.so.*[0-9]"),
             ("nvshmem", "libnvshmem_host.so.*[0-9]"), ("cufile", "libcufile.so.*[0-9]")]


def status() -> dict[str, float]:
    fields = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in open("/proc/self/status")
            if line.startswith(fields)}


def steps() -> list[tuple[str, str]]:
    """(label, statement) in load order; CUDA libraries that are not installed are left out."""
    site = sysconfig.get_paths()["purelib"]
    lib = f"{site}/torch/lib"
    found = [(name, sorted(glob.glob(f"{site}/nvidia/**/lib/{pattern}", recursive=True)))
             for name, pattern in CUDA_LIBS]
    return ([("numpy + pyarrow", "import numpy, pyarrow"), ("pa.array (imports pandas)", "pyarrow.array([0])"),
             ("libtorch_global_deps", f"ctypes.CDLL({lib + '/libtorch_global_deps.so'!r}, mode=ctypes.RTLD_GLOBAL)")]
            + [(name, f"ctypes.CDLL({paths[0]!r})") for name, paths in found if paths]
            + [(name, f"ctypes.CDLL({lib + '/' + name + '.so'!r})") for name in ("libtorch_cpu", "libtorch_cuda",
                                                                                "libtorch_python")
               if os.path.exists(f"{lib}/{name}.so")]
            + [("import torch (the rest)", "import torch")])


def child() -> None:
    """Run the steps in this process and print {label: {rss_mb, anon_mb, file_mb, seconds}} as JSON."""
    out: dict[str, Any] = {"start": status()}
    scope: dict[str, Any] = {"ctypes": ctypes}
    for label, statement in steps():
        before, started = status(), time.perf_counter()
        try:
            exec(statement, scope)
        except (ImportError, OSError) as e:  # e.g. no pyarrow in a bare venv
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            continue
        after = status()
        out[label] = {"rss_mb": round(after["VmRSS"] - before["VmRSS"], 1),
                      "anon_mb": round(after["RssAnon"] - before["RssAnon"], 1),
                      "file_mb": round(after["RssFile"] - before["RssFile"], 1),
                      "seconds": round(time.perf_counter() - started, 3)}
    out["end"] = status()
    out["torch"] = scope["torch"].__version__
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench_torch_rss.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child()
    pythons = dict(p.split("=", 1) for p in args.python) or {"this": sys.executable}
    runs = {name: json.loads(subprocess.run([python, __file__, "--child"], capture_output=True, text=True,
                                            check=True).stdout) for name, python in pythons.items()}
    labels = list(dict.fromkeys(k for run in runs.values() for k in run if k not in ("start", "end", "torch")))
    print(f"{'step':28} " + " ".join(f"{name + ' MiB (anon/file)':>34}" for name in runs))
    for label in labels:
        cells = [f"{r[label]['rss_mb']:>8.1f} ({r[label]['anon_mb']:.1f}/{r[label]['file_mb']:.1f})"
                 if "rss_mb" in r.get(label, {}) else "-" for r in runs.values()]
        print(f"{label[:28]:28} " + " ".join(f"{c:>34}" for c in cells))
    print(f"{'RSS at the end':28} " + " ".join(f"{r['end']['VmRSS']:>34.1f}" for r in runs.values()))
    Path(args.out).write_text(json.dumps({"load_average_at_start": os.getloadavg(), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
