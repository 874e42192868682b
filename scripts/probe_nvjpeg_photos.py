#!/usr/bin/env python
"""Why nvJPEG's calls take 2-3x longer inside the pipeline than alone (photos ~0.7 s per 1024 against ~0.3).

Two decode threads (one HardwareDecoder and stream each, per-image outputs as the pipeline's photo units)
decode batches of `--batch` photos under one condition at a time; per condition the mean host seconds per
call and img/s over both threads. Conditions: alone (the same bytes every call); fresh (bytes read from the
files just before each call, as the reader threads hand them over); fresh + 4 threads reading other files
meanwhile (into new buffers, or into buffers made once); beside the CUDA-graph tower running on a third thread
(on the legacy default stream, or on a stream of its own as in the pipeline, or in a child process: a CUDA
context of its own, whose driver calls then do not wait behind this process's); beside the encoder thread's resize
of the previous outputs (what `--gpu-resize auto` does for photos); pinned (page-locked bytes, alone or beside
the tower); the GPU_HYBRID backend (the SMs decode, as `--gpu-sm-decoders`), alone or beside the tower. Each
condition also sums the calls' thread usage (CPU s, minor faults, voluntary/involuntary context switches):
CPU s near the wall time means the call computes, far below it that it waits. Beside the tower, also the
tower's img/s and the host time of each of its launches (p50 / p99 / max ms: a launch that waits behind
nvJPEG's calls shows here).

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read(path: Path) -> Any:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def background(works: list[Callable[[], Any]], stop: threading.Event) -> list[threading.Thread]:
    """One thread per work, each running its work in a loop until `stop`."""
    def loop(work: Callable[[], Any]) -> None:
        while not stop.is_set():
            work()
    threads = [threading.Thread(target=loop, args=(work,), daemon=True) for work in works]
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


def yuv_check(batch: list[Any], sizes: list[tuple[int, int]], count: int = 64) -> dict[str, float]:
    """Mean and max |RGB levels| between nvJPEG's RGB output and its YUV output converted here (4:2:0 chroma
    upsampled by repetition, BT.601 full range as JPEG's JFIF), over `count` images."""
    import torch.nn.functional as F

    from pnsfw.indexer.gpu.nvjpeg import OUTPUT_YUV, HardwareDecoder

    rgb_decoder, yuv_decoder = HardwareDecoder(), HardwareDecoder(output=OUTPUT_YUV)
    rgbs = rgb_decoder.decode(batch[:count], sizes[:count], "cuda")
    yuvs = yuv_decoder.decode(batch[:count], sizes[:count], "cuda")
    torch.cuda.synchronize()
    diffs = []
    for rgb, yuv in zip(rgbs, yuvs):
        _, height, width = yuv.shape
        y = yuv[0].float()
        chroma = yuv[1:, :(height + 1) // 2, :(width + 1) // 2].float()[None]
        cb, cr = F.interpolate(chroma, scale_factor=2, mode="nearest")[0, :, :height, :width] - 128.0
        ours = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb]).round().clamp(0, 255)
        diffs.append((ours - rgb.float()).abs())
    rgb_decoder.close()
    yuv_decoder.close()
    return {"mean_levels": round(float(torch.stack([d.mean() for d in diffs]).mean()), 3),
            "max_levels": round(float(max(d.max() for d in diffs)), 1)}


def tower_rate(model: Callable[[Any], Any], images: Any, calls: int = 10) -> float:
    """img/s of `model` looping alone on a stream of its own."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode():
        model(images)
        stream.synchronize()
        began = time.perf_counter()
        for _ in range(calls):
            model(images)
        stream.synchronize()
    return round(calls * len(images) / (time.perf_counter() - began), 1)


def launch_stats(seconds: list[float], loops: int, batch: int, wall: float) -> dict[str, Any]:
    """The tower's img/s and its launches' host ms (p50, p99, max) over a condition."""
    ordered = sorted(seconds) or [0.0]
    pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return {"tower_img_per_s": round(loops * batch / wall, 1) if wall else None, "launches": len(seconds),
            "launch_ms_p50": pick(0.5), "launch_ms_p99": pick(0.99), "launch_ms_max": round(1000 * ordered[-1], 3)}


def child_tower(model_path: str, batch: int, ready: Any, stop: Any, out: Any) -> None:
    """In a spawned process (a CUDA context of its own): the graph tower looping on a stream of its own until
    `stop`; puts launch_stats on `out`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.tower import image_model

    encoder = load_encoder(model_path, "cuda", "fp16")
    model = image_model(encoder, GpuOptions(tower="fast"), 0, batch)
    images = torch.zeros((batch, 3, 224, 224), device="cuda")
    stream = torch.cuda.Stream()
    launches: list[float] = []
    with torch.cuda.stream(stream), torch.inference_mode():
        model(images)  # capture
        stream.synchronize()
        ready.set()
        began, loops = time.perf_counter(), 0
        while not stop.is_set():
            started = time.perf_counter()
            model(images)
            launches.append(time.perf_counter() - started)
            stream.synchronize()
            loops += 1
    out.put(launch_stats(launches, loops, batch, time.perf_counter() - began))


class ChildTower:
    """`with ChildTower(model, batch) as result:` the tower loops in a child process meanwhile; `result` holds
    its launch_stats after the block."""

    def __init__(self, model_path: str, batch: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.ready, self.stop, self.out = context.Event(), context.Event(), context.Queue()
        self.process = context.Process(target=child_tower, args=(model_path, batch, self.ready, self.stop,
                                                                 self.out), daemon=True)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> dict[str, Any]:
        self.process.start()
        deadline = time.monotonic() + 180
        while not self.ready.wait(0.5):
            if not self.process.is_alive():
                raise RuntimeError(f"the child's tower exited (code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError("the child's tower was not ready in 180 s")
        return self.result

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.result.update(self.out.get(timeout=120))
        self.process.join(timeout=60)


def profiler(on: bool) -> Any:
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if on else nullcontext()


def api_summary(profile: Any, top: int = 25) -> list[dict[str, Any]]:
    """The profiled window's events by total host time: CUDA runtime/driver calls (nvJPEG's included) and
    GPU activity (kernels, copies), as name, count, total ms."""
    rows = sorted(profile.key_averages(), key=lambda e: -(e.cpu_time_total + e.device_time_total))
    return [{"name": e.key[:80], "count": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 2),
             "device_ms": round(e.device_time_total / 1e3, 2)} for e in rows[:top]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--green", nargs="*", type=int, default=[],
                    help="also the tower on a green context of each of these SM counts (alone, and beside)")
    ap.add_argument("--only", nargs="*", help="run only these conditions")
    ap.add_argument("--profile", nargs="*", default=[],
                    help="the conditions to run under torch.profiler (CUDA API calls summed)")
    args = ap.parse_args()
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu.nvjpeg import BACKEND_GPU_HYBRID, OUTPUT_YUV, HardwareDecoder, page_locked
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

    locked = [[page_locked(t) for t in batch] for batch in batches]

    def pinned(i: int) -> list[Any]:  # the same bytes every call, page-locked (`--gpu-bitstreams pinned`)
        return locked[i]

    def tower() -> None:
        with torch.inference_mode():
            model(images)
        torch.cuda.current_stream().synchronize()

    tower_stream: list[Any] = []
    tower_launches: list[float] = []

    def tower_own_stream() -> None:  # as the pipeline runs it: on a stream of its own; its launches timed
        if not tower_stream:
            tower_stream.append(torch.cuda.Stream())
        with torch.cuda.stream(tower_stream[0]), torch.inference_mode():
            started = time.perf_counter()
            model(images)
            tower_launches.append(time.perf_counter() - started)
            tower_stream[0].synchronize()

    buffers = [bytearray(max(p.stat().st_size for p in files)) for _ in range(64)]

    def read_reused() -> None:  # the same reads into buffers made once: no allocation, no page faults
        for path, buffer in zip(others[:64], buffers):
            with open(path, "rb", buffering=0) as f:
                f.readinto(buffer)

    def resize() -> None:
        if keep:
            resize_crop(keep[0], 224, torch.float16)
            torch.cuda.current_stream().synchronize()

    def read_fresh() -> None:
        [read(p) for p in others[:64]]

    def green_tower(sms: int) -> Callable[[], None]:
        """The graph tower looping on a green context of `sms` SMs (its own model: captured on that stream)."""
        from pnsfw.indexer.gpu.green import green_stream

        stream, got = green_stream(0, sms)
        green_model = image_model(encoder, GpuOptions(tower="fast"), 0, args.batch)
        with torch.cuda.stream(stream), torch.inference_mode():
            green_model(images)  # capture
            stream.synchronize()
            began = time.perf_counter()
            for _ in range(10):
                green_model(images)
            stream.synchronize()
        results[f"tower_alone_{sms}_sms"] = {"sms": got, "img_per_s": round(10 * args.batch /
                                                                          (time.perf_counter() - began), 1)}
        print(f"tower alone on {got} SMs", results[f"tower_alone_{sms}_sms"], flush=True)

        def loop() -> None:
            with torch.cuda.stream(stream), torch.inference_mode():
                green_model(images)
            stream.synchronize()
        return loop

    conditions: dict[str, tuple[Any, list[Callable[[], Any]], dict[str, Any]]] = {
        "alone": (None, [], {}), "fresh": (fresh, [], {}),
        "fresh_plus_4_readers": (fresh, [read_fresh] * 4, {}),
        "fresh_plus_4_readers_reused": (fresh, [read_reused] * 4, {}),
        "beside_graph_tower": (None, [tower], {}), "beside_resize": (None, [resize], {}),
        "beside_graph_tower_own_stream": (None, [tower_own_stream], {}),
        "beside_tower_in_child_process": (None, [], {}),
        "fresh_plus_4_readers_tower_own_stream": (fresh, [read_fresh] * 4 + [tower_own_stream], {}),
        "pinned": (pinned, [], {}), "pinned_fresh": (lambda i: [page_locked(t) for t in fresh(i)], [], {}),
        "pinned_beside_graph_tower_own_stream": (pinned, [tower_own_stream], {}),
        "alone_gpu_hybrid": (None, [], {"backend": BACKEND_GPU_HYBRID}),  # the SMs decode (--gpu-sm-decoders)
        "beside_graph_tower_own_stream_gpu_hybrid": (None, [tower_own_stream], {"backend": BACKEND_GPU_HYBRID}),
        "alone_yuv_output": (None, [], {"output": OUTPUT_YUV}),
        "beside_graph_tower_own_stream_yuv_output": (None, [tower_own_stream], {"output": OUTPUT_YUV})}
    if "alone_yuv_output" in (args.only or ["alone_yuv_output"]):
        results["yuv_vs_rgb_output"] = yuv_check(batches[0], sizes[0])
        print("yuv_vs_rgb_output", results["yuv_vs_rgb_output"], flush=True)
    for sms in args.green:
        loop = green_tower(sms)
        conditions[f"beside_green_tower_{sms}"] = (None, [loop], {})
        conditions[f"fresh_plus_4_readers_green_tower_{sms}"] = (fresh, [read_fresh] * 4 + [loop], {})
    if args.green:
        results["tower_alone_all_sms"] = {"img_per_s": tower_rate(model, images)}
    for name, (source, side, kwargs) in conditions.items():
        if args.only and name not in args.only:
            continue
        decoders = [HardwareDecoder(**kwargs) for _ in range(2)]
        child = ChildTower(args.model, args.batch) if name == "beside_tower_in_child_process" else nullcontext({})
        with child as beside:
            stop = threading.Event()
            tower_launches.clear()
            threads = background(side, stop)
            profile = profiler(name in args.profile)
            began = time.perf_counter()
            with profile:
                results[name] = decode_loop(decoders, batches, sizes, args.calls, source, keep)
            stop.set()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - began
        if tower_launches:
            results[name].update(launch_stats(tower_launches, len(tower_launches), args.batch, wall))
        results[name].update(beside)
        results[name]["call_usage"] = {k: round(sum(d.usage[k] for d in decoders), 4) for k in decoders[0].usage}
        if name in args.profile:
            results[name]["cuda_api"] = api_summary(profile)
        for decoder in decoders:
            decoder.close()
        print(name, results[name], flush=True)
    if args.out:
        args.out.write_text(json.dumps({"batch": args.batch, "calls": args.calls, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
