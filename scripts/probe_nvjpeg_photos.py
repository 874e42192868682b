#!/usr/bin/env python
"""Why nvJPEG's calls on 2 MP photos take ~0.7 s per 1024 inside the pipeline but ~0.15-0.3 s alone.

Two decode threads (one HardwareDecoder and stream each, per-image outputs as the pipeline's photo units)
decode batches of `--batch` photos under one condition at a time; per condition the mean host seconds per
call and img/s over both threads. Conditions: alone (the same bytes every call); fresh (bytes read from the
files just before each call, as the reader threads hand them over); fresh + 4 threads reading other files
meanwhile; beside the CUDA-graph tower running on a third thread; beside the encoder thread's resize of the
previous outputs (what `--gpu-resize auto` does for photos); pinned (the binding's pinned staging).

Example::

    python scripts/probe_nvjpeg_photos.py /tmp/pnsfw-bench/photos --model vit-b-32.pt --out probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read(path: Path) -> Any:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def background(work: Callable[[], None], count: int, stop: threading.Event) -> list[threading.Thread]:
    def loop() -> None:
        while not stop.is_set():
            work()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def decode_loop(decoders: list[Any], batches: list[list[Any]], sizes: list[list[tuple[int, int]]],
                calls: int, fresh: Callable[[int], list[Any]] | None, keep: list[Any]) -> dict[str, float]:
    """Both threads, `calls` timed calls each after one warm-up; (host s per call, img/s)."""
    host: list[float] = []

    def run(i: int) -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for call in range(calls + 1):
                data = fresh(i) if fresh else batches[i]
                started = time.perf_counter()
                out = decoders[i].decode(data, sizes[i], "cuda")
                if call:
                    host.append(time.perf_counter() - started)
                keep[:] = [out]
        stream.synchronize()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(decoders))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    images = len(decoders) * (calls + 1) * len(batches[0])
    return {"host_s_per_call": round(sum(host) / len(host), 4), "img_per_s": round(images / wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu.nvjpeg import HardwareDecoder
    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.probe import jpeg_size
    from pnsfw.indexer.gpu.tower import image_model
    from pnsfw.indexer.tensor_preprocess import resize_crop

    files = sorted(args.folder.glob("*.jpg"))[: 4 * args.batch]
    halves = [files[i * args.batch:(i + 1) * args.batch] for i in range(2)]
    batches = [[read(p) for p in half] for half in halves]
    sizes = [[jpeg_size(bytes(t[:4096].numpy().tobytes())) or (1632, 1224) for t in b] for b in batches]
    others = files[2 * args.batch:]
    encoder = load_encoder(args.model, "cuda", "fp16")
    model = image_model(encoder, GpuOptions(tower="fast"), 0, args.batch)
    images = torch.zeros((args.batch, 3, 224, 224), device="cuda")
    results: dict[str, Any] = {}
    keep: list[Any] = []

    def fresh(i: int) -> list[Any]:
        return [read(p) for p in halves[i]]

    def tower() -> None:
        with torch.inference_mode():
            model(images)
        torch.cuda.current_stream().synchronize()

    def resize() -> None:
        if keep:
            resize_crop(keep[0], 224, torch.float16)
            torch.cuda.current_stream().synchronize()

    conditions: dict[str, tuple[Any, Callable[[], None] | None, int, dict[str, Any]]] = {
        "alone": (None, None, 0, {}), "fresh": (fresh, None, 0, {}),
        "fresh_plus_4_readers": (fresh, lambda: [read(p) for p in others[:64]], 4, {}),
        "beside_graph_tower": (None, tower, 1, {}), "beside_resize": (None, resize, 1, {}),
        "pinned": (None, None, 0, {"pinned": True}), "pinned_fresh": (fresh, None, 0, {"pinned": True})}
    for name, (source, side, count, kwargs) in conditions.items():
        decoders = [HardwareDecoder(**kwargs) for _ in range(2)]
        stop = threading.Event()
        threads = background(side, count, stop) if side else []
        results[name] = decode_loop(decoders, batches, sizes, args.calls, source, keep)
        stop.set()
        for thread in threads:
            thread.join()
        for decoder in decoders:
            decoder.close()
        print(name, results[name], flush=True)
    if args.out:
        args.out.write_text(json.dumps({"batch": args.batch, "calls": args.calls, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
