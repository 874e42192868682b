#!/usr/bin/env python
"""Where the GPU indexing time goes: each stage of pnsfw's tensor path alone, on one corpus folder.

Stages, each timed alone (CUDA synchronised around the timed region, after a
warm-up batch), images/s:

* read: read + sha256 + JPEG probe, one thread (the GIL-bound part of the readers);
* decode: nvJPEG batch decode (`torchvision.io.decode_jpeg(list, device="cuda")`);
* resize: the batched bicubic resize + crop (`tensor_preprocess.resize_crop`, fp16);
* encode: the CLIP image tower (fp16 weights) on normalised input, and with torch.compile if --compile;
* decode+resize+encode chained on one stream (no overlap, no CPU work);
* the tower with cuDNN autotuning, at twice the batch, and under bf16 autocast;
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


def tower_variants(encoder: Any, pixels: Any, repeats: int) -> dict[str, float]:
    """The image tower in other set-ups: cuDNN autotuned patch conv, bf16 autocast on fp32 weights, batch x2."""
    from pnsfw.indexer.gpu.tower import reference_model as _half_model
    from pnsfw.indexer.tensor_preprocess import normalize

    images = normalize(pixels)
    model = _half_model(encoder)
    out: dict[str, float] = {}
    with torch.inference_mode():
        torch.backends.cudnn.benchmark = True
        out["encode_fp16_cudnn_benchmark"] = len(images) / timed(lambda: model(images), repeats)
        double = torch.cat([images, images])
        out["encode_fp16_cudnn_benchmark_batch_x2"] = len(double) / timed(lambda: model(double), repeats)
        torch.backends.cudnn.benchmark = False
        visual = encoder.model.visual

        def bf16() -> Any:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return visual(images)

        out["encode_bf16_autocast"] = len(images) / timed(bf16, repeats)
    return out


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
    from pnsfw.indexer.gpu.probe import jpeg_size
    from pnsfw.indexer.gpu.probe import read_local as _read_local
    from pnsfw.indexer.gpu.tower import reference_model as _half_model
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
    model = _half_model(encoder)
    model = torch.compile(model) if args.compile else model

    def encode(images: Any) -> Any:
        with torch.inference_mode():
            return model(normalize(images))

    results = {"read_probe_hash_1thread": 1 / read_s,
               "decode_nvjpeg": batch / timed(lambda: _decode_jpegs(data, "cuda"), args.repeats),
               "resize_crop_fp16": batch / timed(lambda: resize_crop(decoded, size, torch.float16), args.repeats),
               "encode_fp16": batch / timed(lambda: encode(pixels), args.repeats),
               "chain_decode_resize_encode": batch / timed(
                   lambda: encode(resize_crop(_decode_jpegs(data, "cuda"), size, torch.float16)), args.repeats)}
    results.update(tower_variants(encoder, pixels, args.repeats))
    results.update(concurrent(lambda: resize_crop(_decode_jpegs(data, "cuda"), size, torch.float16),
                              lambda: encode(pixels), batch, args.repeats))
    report = {"folder": args.folder, "batch": batch, "compile": args.compile, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "images_per_s": {k: round(v, 1) for k, v in results.items()},
              "mean_kib": round(sum(len(b) for b in blobs) / len(blobs) / 1024, 1)}
    for name, value in report["images_per_s"].items():
        print(f"{name:32s} {value:12,.0f} img/s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
