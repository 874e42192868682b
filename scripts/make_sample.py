"""Make a small labelled sample for the demo: sample/dataset/{sfw,nsfw}/... (no explicit content).

`sfw` holds variants of scikit-image's bundled photos; `nsfw` stands in with
drawn, high-contrast synthetic images, so the two classes are learnable.
Usage: python scripts/make_sample.py [OUT] [--per-class 60]
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "page", "moon", "text", "horse")


def photo_variant(rng: np.random.Generator, name: str) -> Image.Image:
    from skimage import data

    arr = np.asarray(getattr(data, name)())
    img = Image.fromarray(arr.astype(np.uint8) if arr.dtype != bool else (arr * 255).astype(np.uint8)).convert("RGB")
    w, h = img.size
    left, top = rng.integers(0, max(1, w // 4)), rng.integers(0, max(1, h // 4))
    crop = img.crop((left, top, left + int(w * 0.7), top + int(h * 0.7)))
    jitter = np.clip(np.asarray(crop, np.float32) * rng.uniform(0.8, 1.2, 3), 0, 255).astype(np.uint8)
    return Image.fromarray(jitter).resize((int(rng.integers(240, 400)), int(rng.integers(200, 320))))


def drawing(rng: np.random.Generator) -> Image.Image:
    size = (int(rng.integers(240, 400)), int(rng.integers(200, 320)))
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        box = sorted(rng.integers(0, size[0], 2)), sorted(rng.integers(0, size[1], 2))
        fill = tuple(int(c) for c in rng.integers(120, 255, 3))
        draw.ellipse((box[0][0], box[1][0], box[0][1], box[1][1]), fill=fill)
    return img


def make_sample(out: Path, per_class: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label in ("sfw", "nsfw"):
        (out / label).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        photo_variant(rng, PHOTOS[i % len(PHOTOS)]).save(out / "sfw" / f"photo{i:03d}.jpg", quality=90)
        drawing(rng).save(out / "nsfw" / f"drawing{i:03d}.jpg", quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="sample/dataset")
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    print(make_sample(Path(args.out), args.per_class))


if __name__ == "__main__":
    main()
