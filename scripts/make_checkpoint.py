#!/usr/bin/env python
"""Build a CLIP checkpoint with random weights that ``clip.load`` accepts.

Tests and benchmarks cannot download OpenAI's weights here, so they build a
model with ``clip.model.CLIP(...)``, seeded random weights, and save it as a
plain state dict (``torch.save(model.state_dict(), path)``).  ``clip.load(path,
device="cpu", jit=False)`` first tries ``torch.jit.load`` (which raises
``RuntimeError`` on a plain state dict), then falls back to ``torch.load`` and
``clip.model.build_model``, which infers the architecture from tensor shapes.

Presets:

* ``tiny``     -- 32 px input, 2+2 layers, width 64, embed_dim 512 (tests).
* ``vit-b-32`` -- the real ViT-B/32 configuration: same shapes and FLOPs as
  OpenAI's released weights (benchmarks).

Usage::

    python scripts/make_checkpoint.py vit-b-32 /tmp/vit-b-32-random.pt --seed 0
    python scripts/make_checkpoint.py tiny tiny.pt --check   # also clip.load it

or from Python::

    from make_checkpoint import make_checkpoint
    make_checkpoint("tiny", tmp_path / "tiny.pt", seed=0)

Notes / gotchas:

* ``clip.model.build_model`` does not read the number of heads from the file:
  it rebuilds with ``heads = width // 64``.  The head count changes no tensor
  shape (nor, for a given seed, any weight), so the saved file is the same for
  ``tiny``'s 2 text heads, but the model ``clip.load`` returns has 1 text head
  (64 // 64).  Compare outputs only between models obtained via ``clip.load``.
* ``clip.load`` converts the weights to fp16 (``convert_weights``) and back to
  fp32 on CPU; ``--half`` stores fp16 like OpenAI's release (half the size).
* Same preset + seed + torch version -> the same bytes, whatever the file is
  called (saved through a file object, so the zip's root folder is always
  ``archive``); the sha256 may differ across torch versions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        embed_dim=512,
        image_resolution=32,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=8,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=2,
    ),
    "vit-b-32": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
}


def build_model(preset: str, seed: int = 0) -> Any:
    """Return a ``clip.model.CLIP`` of ``preset`` with seeded random weights."""
    import torch
    from clip.model import CLIP

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(seed)
    model = CLIP(**PRESETS[preset])  # __init__ calls initialize_parameters()
    return model.eval()


def make_checkpoint(preset: str, path: str | Path, seed: int = 0, half: bool = False) -> Path:
    """Build ``preset`` with random weights and save its state dict to ``path``.

    The file is written to ``path + '.tmp'`` and renamed, so a crash never
    leaves a truncated checkpoint behind.  Returns the resolved path.
    """
    import torch

    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(preset, seed)
    if half:
        from clip.model import convert_weights

        convert_weights(model)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: the zip's root name is then
        torch.save(model.state_dict(), f)  # "archive", not the file's name
    tmp.replace(path)
    return path


def check_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """``clip.load`` the file and encode one image and one text; return facts."""
    import clip
    import torch
    from PIL import Image

    model, preprocess = clip.load(str(path), device=device, jit=False)
    image = preprocess(Image.new("RGB", (300, 200), (200, 30, 90))).unsqueeze(0).to(device)
    with torch.no_grad():
        img = model.encode_image(image)
        txt = model.encode_text(clip.tokenize(["a photo"]).to(device))
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        raise RuntimeError(f"{path}: non-finite embeddings")
    return {
        "input_resolution": int(model.visual.input_resolution),
        "embed_dim": int(img.shape[-1]),
        "text_dim": int(txt.shape[-1]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path, help="output .pt file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--half", action="store_true", help="store fp16 weights (like OpenAI's files)")
    ap.add_argument("--check", action="store_true", help="clip.load the result and encode once")
    args = ap.parse_args(argv)
    path = make_checkpoint(args.preset, args.out, seed=args.seed, half=args.half)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.check:
        print(f"clip.load ok: {check_checkpoint(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
