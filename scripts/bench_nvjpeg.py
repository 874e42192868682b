#!/usr/bin/env python
"""nvJPEG hardware decode on one corpus folder: binding variants, the padded resize, and overlap with the tower.

Each variant of `pnsfw.indexer.gpu.nvjpeg.HardwareDecoder` (creation flags, batched pre-allocation, the
bitstreams in page-locked memory; per-image outputs or one padded batch) decodes the same batch on 1 and 2 threads
(one handle and stream each), img/s over `--repeats` calls per thread after a warm-up call, with the host time
of the call itself. Then the resize of that batch (per-image list vs the padded batch), decode+resize on two
threads, and the same while the image tower runs on a third thread (do they overlap?).

Example::

    python scripts/bench_nvjpeg.py /tmp/pnsfw-bench/thumbs --model vit-b-32.pt --out nvjpeg.json
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

VARIANTS = {  # name: (flags, preallocate, pinned, padded)
    "plain_list": (0, None, False, False),
    "plain_padded": (0, None, False, True),
    "pools_list": (2, None, False, False),  # what --gpu-decoder auto does for units too large to pad (photos)
    "pools_padded": (2, None, False, True),
    "prealloc_padded": (0, (512, 512), False, True),
    "pinned_padded": (0, None, True, True),
    "all_list": (2, (512, 512), True, False),
    "all_padded": (2, (512, 512), True, True),
}


def threaded(work: Callable[[int], Any], threads: int, repeats: int) -> tuple[float, float]:
    """(calls/s over all threads, mean host seconds per call): work(i) on `threads` threads, each on its own
    stream, `repeats` times after one warm-up call each."""
    streams = [torch.cuda.Stream() for _ in range(threads)]
    host: list[float] = []

    def loop(i: int, count: int) -> None:
        with torch.cuda.stream(streams[i]), torch.inference_mode():
            for _ in range(count):
                started = time.perf_counter()
                work(i)
                host.append(time.perf_counter() - started)
        streams[i].synchronize()

    for i in range(threads):
        loop(i, 1)
    host.clear()
    workers = [threading.Thread(target=loop, args=(i, repeats)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * repeats / (time.perf_counter() - started), sum(host) / max(len(host), 1)


def variants(data: list[Any], sizes: list[tuple[int, int]], repeats: int) -> dict[str, Any]:
    from pnsfw.indexer.gpu.nvjpeg import HardwareDecoder, page_locked

    shape = (len(data), 3, max(h for _, h in sizes), max(w for w, _ in sizes))
    locked = [page_locked(t) for t in data]
    out: dict[str, Any] = {}
    for name, (flags, pre, pinned, padded) in VARIANTS.items():
        for threads in (1, 2):
            decoders = [HardwareDecoder(flags, pre) for _ in range(threads)]
            buffers = [torch.empty(shape, dtype=torch.uint8, device="cuda") for _ in range(threads)]

            def work(i: int, decoders: list[Any] = decoders, buffers: list[Any] = buffers,
                     padded: bool = padded, batch: list[Any] = locked if pinned else data) -> None:
                if padded:
                    decoders[i].decode_into(batch, buffers[i])
                else:
                    decoders[i].decode(batch, sizes, "cuda")

            try:
                calls, host = threaded(work, threads, repeats)
                out[f"{name}_{threads}t"] = {"images_per_s": round(calls * len(data)),
                                             "host_ms_per_call": round(host * 1000, 2)}
            except Exception as exc:  # one variant failing must not hide the others
                out[f"{name}_{threads}t"] = {"error": str(exc)}
            for decoder in decoders:
                decoder.close()
            print(f"{name}_{threads}t {out[f'{name}_{threads}t']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu.decode import decode_jpegs
    from pnsfw.indexer.gpu.nvjpeg import HardwareDecoder
    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.probe import jpeg_size, read_local
    from pnsfw.indexer.gpu.tower import image_model
    from pnsfw.indexer.sources import iter_items
    from pnsfw.indexer.tensor_preprocess import normalize, resize_crop, resize_padded

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--skip-variants", action="store_true", help="only the resize and overlap probes")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    blobs = [read_local(item) for item in list(iter_items(args.folder))[:args.batch]]
    data = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
    sizes = [jpeg_size(bytes(b)) for b in blobs]
    report: dict[str, Any] = {"folder": args.folder, "batch": len(data), "device": torch.cuda.get_device_name(),
                              "mean_kib": round(sum(len(b) for b in blobs) / len(blobs) / 1024, 1)}
    rate, host = threaded(lambda i: decode_jpegs(data, "cuda"), 1, args.repeats)
    report["torchvision_1t"] = {"images_per_s": round(rate * len(data)), "host_ms_per_call": round(host * 1000, 2)}
    if not args.skip_variants:
        report["variants"] = variants(data, sizes, args.repeats)
    encoder = load_encoder(args.model, "cuda", "fp16")
    size = encoder.resolution
    listed = decode_jpegs(data, "cuda")
    shapes = [(int(i.shape[1]), int(i.shape[2])) for i in listed]
    padded = torch.zeros((len(data), 3, max(h for h, _ in shapes), max(w for _, w in shapes)), dtype=torch.uint8,
                         device="cuda")
    for i, image in enumerate(listed):
        padded[i, :, :image.shape[1], :image.shape[2]] = image
    want = resize_crop(listed, size, torch.float16)
    got = resize_padded(padded, shapes, size, torch.float16)
    report["padded_equals_list"] = bool(torch.equal(want, got))
    for name, fn in (("resize_list", lambda i: resize_crop(listed, size, torch.float16)),
                     ("resize_padded", lambda i: resize_padded(padded, shapes, size, torch.float16))):
        rate, host = threaded(fn, 1, args.repeats)
        report[name] = {"images_per_s": round(rate * len(data)), "host_ms_per_call": round(host * 1000, 2)}
    decoders = [HardwareDecoder() for _ in range(2)]
    hw_shapes = [(h, w) for w, h in sizes]

    def decode_resize(i: int) -> Any:
        batch = torch.empty(padded.shape, dtype=torch.uint8, device="cuda")
        decoders[i].decode_into(data, batch)
        return resize_padded(batch, hw_shapes, size, torch.float16)

    rate, host = threaded(decode_resize, 2, args.repeats)
    report["decode_resize_2t"] = {"images_per_s": round(rate * len(data)), "host_ms_per_call": round(host * 1000, 2)}
    pixels = normalize(got)
    for tower in ("eager", "fast"):
        model = image_model(encoder, GpuOptions(compile="off", tower=tower), 0, len(data))
        with torch.inference_mode():
            model(pixels)
        report[f"tower_{tower}_alone"] = round(threaded(lambda i, m=model: m(pixels), 1, args.repeats)[0] * len(data))
        report[f"with_tower_{tower}"] = overlap(decode_resize, lambda m=model: m(pixels), len(data), args.repeats)
        if tower == "eager":  # the tower on CUDA's legacy default stream, as the pipeline ran it until round 5
            report["with_tower_eager_default_stream"] = overlap(decode_resize, lambda m=model: m(pixels), len(data),
                                                                args.repeats, own_stream=False)
        report[f"with_tower_{tower}_decode_high_priority"] = overlap(
            decode_resize, lambda m=model: m(pixels), len(data), args.repeats, decode_priority=-1)
    for decoder in decoders:
        decoder.close()
    for key, value in report.items():
        print(f"{key}: {value}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


def overlap(decode_resize: Callable[[int], Any], encode: Callable[[], Any], batch: int, repeats: int,
            own_stream: bool = True, decode_priority: int = 0) -> dict[str, Any]:
    """decode+resize on two threads while the tower runs on a third (each its own stream; the tower's the legacy
    default stream unless `own_stream`; the decode threads' streams of `decode_priority`, -1: high): img/s of
    each side."""
    seconds: dict[str, float] = {}

    def loop(name: str, fn: Callable[[], Any], count: int) -> None:
        if name == "encode":
            stream = torch.cuda.Stream() if own_stream else torch.cuda.default_stream()
        else:
            stream = torch.cuda.Stream(priority=decode_priority)
        with torch.cuda.stream(stream), torch.inference_mode():
            started = time.perf_counter()
            for _ in range(count):
                fn()
            stream.synchronize()
            seconds[name] = time.perf_counter() - started

    threads = [threading.Thread(target=loop, args=(f"decode{i}", lambda i=i: decode_resize(i), repeats))
               for i in range(2)] + [threading.Thread(target=loop, args=("encode", encode, 2 * repeats))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"decode_resize": round(2 * repeats * batch / max(seconds["decode0"], seconds["decode1"])),
            "encode": round(2 * repeats * batch / seconds["encode"])}


if __name__ == "__main__":
    sys.exit(main())
