#!/usr/bin/env python
"""Where the GPU start-up goes before the first batch: each step of the encoder load timed alone, in fresh
processes (issue 13: the CLIP checkpoint load took 4-6 s after torch import on an H200, cause unknown).

Modes (one fresh interpreter each, seconds since the process started, as the pipeline's timeline):
  steps     import torch, CUDA context, checkpoint read (torch.load, mmap), model built (meta + assign + fp16
            rounding), weights to the GPU, sha256 of the file: one after another
  nommap    the same with torch.load(mmap=False)
  nocontext the same without creating the CUDA context first (the copy to the GPU then creates it)
  beside    load_encoder() while the reader's warm-up (torchvision's image ops, nvJPEG) runs on a thread, as in
            `pnsfw index --device cuda`; then the tower's warm-up forward (whether torch._dynamo got imported)
  ops       the encoder loaded, then the first call of each kind of op of the fast tower's forward at the
            pipeline's warm-up batch (256), each synchronised, then whole forwards (round 14: the warm-up
            forward took 1.5 s inside `pnsfw index`)
  ops_eager the same with CUDA_MODULE_LOADING=EAGER (every kernel loaded with its library, not at first use)

Example::

    python scripts/bench_gpu_startup.py /tmp/pnsfw-bench/vit-b-32-seed0.pt --out startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("steps", "nommap", "nocontext", "beside", "ops", "ops_eager")
ENV = {"ops_eager": {"CUDA_MODULE_LOADING": "EAGER"}}


def _since_start() -> float:
    from pnsfw.indexer.timeline import since_process_start

    return round(since_process_start(), 3)


def _timed(marks: dict[str, float], name: str, fn: Any) -> Any:
    started = time.perf_counter()
    value = fn()
    marks[name + "_s"] = round(time.perf_counter() - started, 3)
    marks[name + "_at"] = _since_start()
    return value


def _steps(path: str, mode: str) -> dict[str, float]:
    marks: dict[str, float] = {"python_started_at": _since_start()}
    torch = _timed(marks, "import_torch", lambda: __import__("torch"))
    from pnsfw.indexer import encoder as enc
    from pnsfw.store.files import sha256_file

    if mode != "nocontext":
        _timed(marks, "cuda_context", lambda: torch.zeros(1, device="cuda"))
    state = _timed(marks, "checkpoint_read", lambda: torch.load(path, map_location="cpu", mmap=mode != "nommap",
                                                                weights_only=True))
    model = _timed(marks, "model_built", lambda: enc._build(state))
    _timed(marks, "weights_to_gpu", lambda: (model.to("cuda"), torch.cuda.synchronize()))
    _timed(marks, "sha256", lambda: sha256_file(Path(path)))
    return marks


def _beside(path: str) -> dict[str, float]:
    marks: dict[str, float] = {"python_started_at": _since_start()}
    _timed(marks, "import_torch", lambda: __import__("torch"))
    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu import warm_up

    thread = threading.Thread(target=lambda: _timed(marks, "warm_up_thread", lambda: warm_up("cuda")))
    thread.start()
    encoder = _timed(marks, "load_encoder", lambda: load_encoder(path, "cuda", "fp16"))
    thread.join()
    marks["dynamo_after_load"] = float("torch._dynamo" in sys.modules)
    _timed(marks, "tower_warm_up", lambda: _tower_warm_up(encoder))
    marks["dynamo_after_tower"] = float("torch._dynamo" in sys.modules)
    return marks


def _tower_warm_up(encoder: Any, batch: int = 1024) -> None:
    """What the pipeline does once the encoder is there: the eager fast tower, one forward on zeros."""
    import torch

    from pnsfw.indexer.gpu.options import GpuOptions
    from pnsfw.indexer.gpu.tower import image_model

    model = image_model(encoder, GpuOptions(compile="off", tower="eager"), 0, batch)
    with torch.inference_mode():
        model(torch.zeros((batch, 3, encoder.resolution, encoder.resolution), device="cuda"))
    torch.cuda.synchronize()


def _ops(path: str, batch: int = 256) -> dict[str, float]:
    """The first call of each op kind of the fast tower (pnsfw.indexer.gpu.tower), timed one by one."""
    marks: dict[str, float] = {"python_started_at": _since_start()}
    torch = _timed(marks, "import_torch", lambda: __import__("torch"))
    import torch.nn.functional as F

    from pnsfw.indexer.encoder import load_encoder
    from pnsfw.indexer.gpu import tower

    encoder = _timed(marks, "load_encoder", lambda: load_encoder(path, "cuda", "fp16"))
    fast = _timed(marks, "fast_visual", lambda: tower.fast_visual(encoder.model.visual))
    block = fast.blocks[0]
    width = fast.patch_weight.shape[0]
    tokens = torch.zeros((batch, fast.grid ** 2 + 1, width), device="cuda", dtype=torch.float16)
    patches = torch.zeros((batch, fast.grid ** 2, fast.patch_weight.shape[1]), device="cuda", dtype=torch.float16)
    heads = block.attn.num_heads
    q = tokens.view(batch, -1, heads, width // heads).transpose(1, 2)
    calls = {"patch_gemm": lambda: F.linear(patches, fast.patch_weight),
             "layer_norm": lambda: tower._layer_norm(tokens, block.ln_1),
             "in_proj": lambda: F.linear(tokens, block.attn.in_proj_weight, block.attn.in_proj_bias),
             "sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
             "sdpa_class_token": lambda: F.scaled_dot_product_attention(q[:, :, :1], q, q),
             "mlp": lambda: block.mlp(tokens),
             "class_token_linear": lambda: F.linear(tokens[:, :1], block.attn.in_proj_weight[:width])}
    images = torch.zeros((batch, 3, encoder.resolution, encoder.resolution), device="cuda")
    calls.update({"forward_1": lambda: fast(images), "forward_2": lambda: fast(images),
                  "forward_1024": lambda: fast(images.repeat(4, 1, 1, 1))})
    with torch.inference_mode():
        for name, call in calls.items():
            _timed(marks, name, lambda op=call: (op(), torch.cuda.synchronize()))
    return marks


def child(path: str, mode: str) -> None:
    kinds = {"beside": _beside, "ops": _ops, "ops_eager": _ops}
    marks = kinds[mode](path) if mode in kinds else _steps(path, mode)
    print("MARKS=" + json.dumps(marks), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per mode")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        child(args.checkpoint, args.child)
        return 0
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "bytes": Path(args.checkpoint).stat().st_size}
    for mode in args.modes:
        report[mode] = []
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, __file__, args.checkpoint, "--child", mode], capture_output=True,
                                  text=True, check=False, env={**os.environ, **ENV.get(mode, {})})
            lines = [line for line in done.stdout.splitlines() if line.startswith("MARKS=")]
            report[mode].append(json.loads(lines[-1][6:]) if lines else {"error": done.stderr[-800:]})
            print(mode, json.dumps(report[mode][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
