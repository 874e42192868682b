#!/usr/bin/env python
"""Where the GPU indexing time goes: each stage of pnsfw's tensor path alone, on one corpus folder.

Stages, each timed alone (CUDA synchronised around the timed region, after a
warm-up batch), images/s:

* read: read + sha256 + JPEG probe, one thread (the GIL-bound part of the readers);
* decode: nvJPEG batch decode (`torchvision.io.decode_jpeg(list, device="cuda")`), and nvJPEG's hardware
  engines through our own handles (pnsfw/indexer/gpu/nvjpeg.py) on 1 and 2 threads;
* resize: the batched bicubic resize + crop (`tensor_preprocess.resize_crop`, fp16);
* encode: the image tower the pipeline runs (the fast tower, CUDA graph) on normalised input;
* decode+resize+encode chained on one stream (no overlap, no CPU work);
* the tower variants (CLIP's own modules at fp16, fast eager, fast CUDA graph, each of those two with CLIP's
  QuickGELU as three kernels rather than one SiLU, with --compile max-autotune),
  by CUDA events (median), each with its min cosine to the fp32 forward on the same images;
* decode+resize and encode at the same time on two threads and streams (does the GPU overlap them?).

Example::

    python scripts/bench_gpu_stages.py /tmp/pnsfw-bench/thumbs --model vit-b-32.pt --batch 1024 --out stages.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call: one warm-up, then the mean of `repeats` synchronised calls."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def event_timed(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call by CUDA events: three warm-ups, then the median of `repeats` calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def tower_variants(encoder: Any, pixels: Any, repeats: int, compile_too: bool) -> dict[str, Any]:
    """img/s (CUDA events) and min cosine to the fp32 forward (TF32 off) of each image-tower variant."""
    from pnsfw.indexer.gpu.tower import Graphed, fast_visual, reference_model
    from pnsfw.indexer.tensor_preprocess import normalize

    images = normalize(pixels)
    visual = encoder.model.visual
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        want = visual(images.float()).float()
    torch.backends.cudnn.allow_tf32 = True
    fast, quick = fast_visual(visual), fast_visual(visual, silu=False)  # CLIP's QuickGELU as one SiLU, or not
    variants = {"reference_fp16": reference_model(encoder), "fast_eager": fast,
                "fast_eager_quickgelu": quick, "fast_graph": Graphed(fast, len(images)),
                "fast_graph_quickgelu": Graphed(quick, len(images))}
    if compile_too:
        variants["fast_compiled_max_autotune"] = torch.compile(fast, mode="max-autotune-no-cudagraphs")
    out: dict[str, Any] = {}
    for name, model in variants.items():
        started = time.perf_counter()
        with torch.inference_mode():
            got = model(images).float()
            cosine = torch.nn.functional.cosine_similarity(got, want, dim=1).min().item()
            first_s = time.perf_counter() - started
            out[f"tower_{name}"] = {"images_per_s": round(len(images) / event_timed(lambda m=model: m(images),
                                                                                      repeats), 1),
                                    "min_cosine_vs_fp32": round(cosine, 7), "first_call_s": round(first_s, 2)}
        print(f"tower {name:28s} {out[f'tower_{name}']}", flush=True)
    return out


def hardware_decode(data: list[Any], sizes: list[tuple[int, int]], threads: int, repeats: int) -> float | None:
    """img/s of nvJPEG's hardware engines through our own handles, one per thread (None: unavailable)."""
    import threading

    from pnsfw.indexer.gpu.nvjpeg import HardwareDecoder, NvjpegError

    try:
        decoders = [HardwareDecoder() for _ in range(threads)]
    except NvjpegError as exc:
        print(f"hardware decoder unavailable: {exc}")
        return None
    streams = [torch.cuda.Stream() for _ in range(threads)]

    failed: list[str] = []

    def loop(i: int, count: int) -> None:
        try:
            with torch.cuda.stream(streams[i]):
                for _ in range(count):
                    decoders[i].decode(data, sizes, "cuda")
            streams[i].synchronize()
        except NvjpegError as exc:
            failed.append(str(exc))

    for i in range(threads):
        loop(i, 1)
    workers = [threading.Thread(target=loop, args=(i, repeats)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    rate = threads * repeats * len(data) / (time.perf_counter() - started)
    for decoder in decoders:
        decoder.close()
    if failed:
        print(f"hardware decode failed: {failed[0]}")
    return None if failed else rate


def concurrent(decode: Callable[[], Any], encode: Callable[[], Any], batch: int, repeats: int) -> dict[str, float]:
    """decode+resize on one thread and stream while encode runs on another: images/s of each side, to see
    whether the GPU overlaps them (each near its rate alone) or serialises them (the rates add up as times)."""
    import threading

    def loop(fn: Callable[[], Any], stream: Any, seconds: list[float]) -> None:
        with torch.cuda.stream(stream), torch.inference_mode():
            started = time.perf_counter()
            for _ in range(repeats):
                fn()
            stream.synchronize()
            seconds.append(time.perf_counter() - started)

    decode_s: list[float] = []
    encode_s: list[float] = []
    threads = [threading.Thread(target=loop, args=(decode, torch.cuda.Stream(), decode_s)),
               threading.Thread(target=loop, args=(encode, torch.cuda.Stream(), encode_s))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"concurrent_decode_resize": batch * repeats / decode_s[0],
            "concurrent_encode": batch * repeats / encode_s[0]}


def main(argv: list[str] | None = None) -> int:
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu.decode import decode_jpegs as _decode_jpegs
    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.probe import jpeg_size
    from pnsfw.indexer.gpu.probe import read_local as _read_local
    from pnsfw.indexer.gpu.tower import image_model
    from pnsfw.indexer.sources import iter_items
    from pnsfw.indexer.tensor_preprocess import normalize, resize_crop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    items = list(iter_items(args.folder))[:args.batch * 2]
    t0 = time.perf_counter()
    blobs = [_read_local(item) for item in items]
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
        jpeg_size(blob)
    read_s = (time.perf_counter() - t0) / len(items)
    data = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs[:args.batch]]
    encoder = load_encoder(args.model, "cuda", "fp16")
    size, batch = encoder.resolution, len(data)
    decoded = _decode_jpegs(data, "cuda")
    pixels = resize_crop(decoded, size, torch.float16)
    model = image_model(encoder, GpuOptions(compile="off"), 0, batch)

    def encode(images: Any) -> Any:
        with torch.inference_mode():
            return model(normalize(images))

    results = {"read_probe_hash_1thread": 1 / read_s,
               "decode_nvjpeg": batch / timed(lambda: _decode_jpegs(data, "cuda"), args.repeats),
               "resize_crop_fp16": batch / timed(lambda: resize_crop(decoded, size, torch.float16), args.repeats),
               "encode_fp16": batch / timed(lambda: encode(pixels), args.repeats),
               "chain_decode_resize_encode": batch / timed(
                   lambda: encode(resize_crop(_decode_jpegs(data, "cuda"), size, torch.float16)), args.repeats)}
    sizes = [jpeg_size(bytes(b)) for b in blobs[:batch]]
    for threads in (1, 2):
        rate = hardware_decode(data, sizes, threads, args.repeats)
        if rate is not None:
            results[f"decode_nvjpeg_hardware_{threads}thread"] = rate
    towers = tower_variants(encoder, pixels, max(args.repeats, 10), args.compile)
    results.update(concurrent(lambda: resize_crop(_decode_jpegs(data, "cuda"), size, torch.float16),
                              lambda: encode(pixels), batch, args.repeats))
    report = {"folder": args.folder, "batch": batch, "compile": args.compile, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "images_per_s": {k: round(v, 1) for k, v in results.items()},
              "towers": towers, "mean_kib": round(sum(len(b) for b in blobs) / len(blobs) / 1024, 1)}
    for name, value in report["images_per_s"].items():
        print(f"{name:32s} {value:12,.0f} img/s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
