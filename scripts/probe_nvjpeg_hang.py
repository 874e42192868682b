#!/usr/bin/env python
"""Does nvJPEG's hardware batched decode hang the way round 5's pipeline did? Two decode threads (one handle and
stream each) decode thumbnails into one padded batch per call, in the pipeline's batch-size pattern (a first unit
of 256, then 1024s, a short last one, over and over), with the padded resize on a side stream and optionally the
image tower running on a third thread. Each binding runs in a subprocess killed after `--timeout` s
(start-up, ~10 s with the tower, included; the `fixed` binding's guard needs 20 s to report a wedged call),
whose progress lines tell a slow child from a hung one:

* `reinit`: round 5's binding. One decode state per handle, re-initialised (nvjpegDecodeBatchedInitialize) when
  the batch size changes, with no wait for the state's previous call.
* `reuse`: one state per batch size (never re-initialised), but no wait for a state's previous call.
* `fixed`: pnsfw's HardwareDecoder now (a state per size, each state's previous call waited for, guarded call).

Example::

    python scripts/probe_nvjpeg_hang.py /tmp/pnsfw-bench/thumbs --model vit-b-32.pt --rounds 20 --out hang.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PATTERN = [256, 1024, 1024, 1024, 416]


class RawDecoder:
    """round 5's binding without its Python frills: `per_size` False re-initialises one state on size changes."""

    def __init__(self, per_size: bool):
        from pnsfw.indexer.gpu.nvjpeg import BACKEND_HARDWARE, FLAG_MEMORY_POOLS, library

        self.lib, self.per_size = library(), per_size
        self.handle = ctypes.c_void_p()
        self.lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, FLAG_MEMORY_POOLS, ctypes.byref(self.handle))
        self.states: dict[int, list[Any]] = {}

    def _state(self, count: int) -> Any:
        from pnsfw.indexer.gpu.nvjpeg import OUTPUT_RGB

        key = count if self.per_size else 0
        if key not in self.states:
            self.states[key] = [ctypes.c_void_p(), 0]  # [state, the batch size it is initialised for]
            self.lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.states[key][0]))
        entry = self.states[key]
        if entry[1] != count:
            self.lib.nvjpegDecodeBatchedInitialize(self.handle, entry[0], count, 1, OUTPUT_RGB)
            entry[1] = count
        return entry[0]

    def decode_into(self, data: list[Any], out: Any) -> None:
        import numpy as np
        import torch

        from pnsfw.indexer.gpu.nvjpeg import Image, padded_table

        count = len(data)
        table = padded_table(out, count)
        pointers = np.fromiter((t.data_ptr() for t in data), np.uint64, count)
        lengths = np.fromiter((t.numel() for t in data), np.uint64, count)
        status = self.lib.nvjpegDecodeBatched(self.handle, self._state(count),
                                              pointers.ctypes.data_as(ctypes.POINTER(ctypes.c_void_p)),
                                              lengths.ctypes.data_as(ctypes.POINTER(ctypes.c_size_t)),
                                              table.ctypes.data_as(ctypes.POINTER(Image)),
                                              torch.cuda.current_stream().cuda_stream)
        if status:
            raise RuntimeError(f"nvjpegDecodeBatched: status {status}")


def child(args: argparse.Namespace) -> int:
    """One binding in this process: prints one JSON line (calls, seconds)."""
    import torch

    from pnsfw.indexer.gpu.nvjpeg import HardwareDecoder
    from pnsfw.indexer.gpu.probe import jpeg_size, read_local
    from pnsfw.indexer.sources import iter_items
    from pnsfw.indexer.tensor_preprocess import resize_padded

    t0 = time.perf_counter()
    blobs = [read_local(item) for item in list(iter_items(args.folder))[:max(PATTERN)]]
    data = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
    sizes = [jpeg_size(bytes(b)) for b in blobs]
    shape = (3, max(h for _, h in sizes), max(w for w, _ in sizes))
    decoders = [HardwareDecoder() if args.child == "fixed" else RawDecoder(args.child == "reuse") for _ in range(2)]
    stop, calls, errors = threading.Event(), [0, 0], []
    tower = _tower(args.model, shape) if args.model else None

    def decode(i: int) -> None:
        try:
            loop(i)
        except Exception as exc:  # the fixed binding's NvjpegStalled
            errors.append(f"{type(exc).__name__}: {exc}")

    def loop(i: int) -> None:
        stream, side = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(args.rounds):
                for count in PATTERN:
                    out = torch.empty((count, *shape), dtype=torch.uint8, device="cuda")
                    decoders[i].decode_into(data[:count], out)
                    side.wait_stream(stream)
                    out.record_stream(side)
                    with torch.cuda.stream(side):
                        resize_padded(out, [(h, w) for w, h in sizes[:count]], 224, torch.float16)
                    calls[i] += 1
                    if calls[i] % 25 == 0:  # progress: a killed child shows how far it got (hung or slow)
                        print(json.dumps({"thread": i, "calls": calls[i], "at_s": round(time.perf_counter() - t0, 1)}),
                              flush=True)
        stream.synchronize()
        side.synchronize()

    threads = [threading.Thread(target=decode, args=(i,), daemon=True) for i in range(2)]
    if tower is not None:
        threads.append(threading.Thread(target=tower, args=(stop,), daemon=True))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads[:2]:
        thread.join()
    stop.set()
    print(json.dumps({"calls": sum(calls), "seconds": round(time.perf_counter() - started, 2), "errors": errors,
                      "images_per_s": round(sum(calls) * sum(PATTERN) / len(PATTERN)
                                            / (time.perf_counter() - started))}), flush=True)
    return 0


def _tower(model: str, shape: tuple[int, int, int]) -> Any:
    import torch

    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.tower import image_model

    encoder = load_encoder(model, "cuda", "fp16")
    tower = image_model(encoder, GpuOptions(compile="off"), 0, 1024)
    pixels = torch.zeros((1024, 3, 224, 224), device="cuda")

    def run(stop: threading.Event) -> None:
        with torch.cuda.stream(torch.cuda.Stream()), torch.inference_mode():
            while not stop.is_set():
                tower(pixels)
                torch.cuda.current_stream().synchronize()

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--model", help="a CLIP checkpoint: its tower runs beside the decode")
    ap.add_argument("--rounds", type=int, default=20, help="passes over the batch-size pattern per thread")
    ap.add_argument("--tries", type=int, default=2, help="subprocesses per binding")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per subprocess (start-up included)")
    ap.add_argument("--bindings", default="reinit,reuse,fixed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    report: dict[str, list[Any]] = {}
    for binding in args.bindings.split(","):
        for _ in range(args.tries):
            cmd = [sys.executable, __file__, args.folder, "--rounds", str(args.rounds), "--child", binding]
            cmd += ["--model", args.model] if args.model else []
            started = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                result: Any = json.loads(lines[-1]) if lines else {"rc": done.returncode,
                                                                   "stderr": done.stderr[-400:]}
            except subprocess.TimeoutExpired as exc:  # its last progress line says whether it was moving
                partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
                result = {"killed_after_s": round(time.perf_counter() - started, 1),
                          "progress": [line for line in partial.splitlines() if line.startswith("{")][-2:]}
            report.setdefault(binding, []).append(result)
            print(binding, result, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
