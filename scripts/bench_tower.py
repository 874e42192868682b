"""The CLIP image tower alone on this CPU: how fast can any pipeline go?

Usage: python scripts/bench_tower.py CHECKPOINT [--batch 64] [--threads 2] [--rounds 1] [--out bench_tower.json]
       [--variants fp32 bf16-autocast bf16-weights bf16-compiled int8-dynamic fast-fp32 fast-fp32-quickgelu
        fast-bf16 fast-bf16-quickgelu openvino-f32 openvino-bf16]

Random input; per variant and round one warm-up pass, then 3 timed batches; the variants in turn for
`--rounds` rounds. Prints img/s (each round's, then the median) and the minimum cosine similarity to the fp32
output, writes JSON. openvino-* run only where the `openvino` package imports.
"""

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's pnsfw


def bf16_weights(visual: Any) -> Any:
    """The tower with matmul weights in bf16 and LayerNorm in fp32, as clip's convert_weights does for fp16."""
    import clip.model

    def to_bf16(layer: Any) -> None:
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            layer.to(torch.bfloat16)
        if isinstance(layer, torch.nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias"):
                getattr(layer, name).data = getattr(layer, name).data.bfloat16()
    model = copy.deepcopy(visual)
    model.apply(to_bf16)
    for name in ("class_embedding", "positional_embedding", "proj"):
        getattr(model, name).data = getattr(model, name).data.bfloat16()
    assert isinstance(model.ln_pre, clip.model.LayerNorm)  # casts to fp32 inside: stays in fp32
    return lambda x: model(x.bfloat16())


def _openvino(visual: Any, precision: str) -> Callable:
    import openvino as ov

    path = os.path.join(tempfile.mkdtemp(), "tower.onnx")
    torch.onnx.export(visual, torch.randn(1, 3, 224, 224), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                     "PERFORMANCE_HINT": "THROUGHPUT"})
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0].copy())


def _fast(visual: Any, dtype: Any, silu: bool) -> Callable:
    from pnsfw.indexer.gpu.tower import fast_visual

    return fast_visual(visual, dtype, silu)


VARIANTS: dict[str, Callable[[Any], Callable]] = {
    "fp32": lambda v: v,
    "bf16-autocast": lambda v: lambda x: torch.autocast("cpu", dtype=torch.bfloat16)(v)(x),
    "bf16-weights": bf16_weights,
    "bf16-compiled": lambda v: torch.compile(bf16_weights(v)),
    "int8-dynamic": lambda v: torch.ao.quantization.quantize_dynamic(copy.deepcopy(v), {torch.nn.Linear},
                                                                     dtype=torch.qint8),
    # pnsfw's fast tower (pnsfw/indexer/gpu/tower.py), with CLIP's QuickGELU as one SiLU (the default) or not
    "fast-fp32": lambda v: _fast(v, torch.float32, True),
    "fast-fp32-quickgelu": lambda v: _fast(v, torch.float32, False),
    "fast-bf16": lambda v: _fast(v, torch.bfloat16, True),
    "fast-bf16-quickgelu": lambda v: _fast(v, torch.bfloat16, False),
    "openvino-f32": lambda v: _openvino(v, "f32"),
    "openvino-bf16": lambda v: _openvino(v, "bf16"),
}


def measure(run: Callable, x: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        out = run(x[: len(reference)]).float()
        cosine = torch.nn.functional.cosine_similarity(out, reference).min().item()
        run(x)
        start = time.perf_counter()
        for _ in range(3):
            run(x)
        return {"images_per_s": 3 * len(x) / (time.perf_counter() - start), "min_cosine_vs_fp32": cosine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="the variants timed in turn this many times (median)")
    parser.add_argument("--out", default="bench_tower.json")
    args = parser.parse_args()
    import clip

    torch.set_num_threads(args.threads)
    visual = clip.load(args.checkpoint, device="cpu", jit=False)[0].float().eval().visual
    x = torch.randn(args.batch, 3, visual.input_resolution, visual.input_resolution)
    with torch.inference_mode():
        reference = visual(x[:16]).float()
    results: dict[str, Any] = {}
    runs = {}
    for name in args.variants:
        try:
            runs[name] = VARIANTS[name](visual)
        except ImportError as exc:
            results[name] = {"skipped": str(exc)}
    for round_ in range(args.rounds):  # in turn, so that the machine's drift falls on every variant alike
        for name, run in runs.items():
            figures = measure(run, x, reference)
            entry = results.setdefault(name, {"rounds": [], "min_cosine_vs_fp32": figures["min_cosine_vs_fp32"]})
            entry["rounds"].append(round(figures["images_per_s"], 2))
            print(f"round {round_ + 1} {name:20} {figures['images_per_s']:8.2f} img/s", flush=True)
    for name, entry in results.items():
        if "rounds" in entry:
            entry["images_per_s"] = sorted(entry["rounds"])[len(entry["rounds"]) // 2]
            print(f"{name:20} median {entry['images_per_s']:8.2f} img/s  min cosine "
                  f"{entry['min_cosine_vs_fp32']:.6f}", flush=True)
    info = {"machine": platform.platform(), "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0],
            "threads": args.threads, "batch": args.batch, "torch": torch.__version__, "results": results}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
