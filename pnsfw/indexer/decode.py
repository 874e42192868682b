"""Bytes -> CLIP-ready pixels, matching `clip.load(...)[1]` (bicubic short-side resize, center crop).

Runs in worker processes. JPEGs are first shrunk in the DCT domain (PIL `draft`)
to no less than the size the bicubic resize produces, so a 2 MP photo decodes
at 1/4 or 1/8 scale. Failures raise `DecodeFailure(reason, detail)`, which the
pipeline turns into rows of `errors/`.
"""

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit
MAX_ASPECT = 8.0  # beyond this, resize only the crop box (a 1x50000 strip would otherwise be huge)
_EXIF_SWAPS = {5, 6, 7, 8}
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class DecodeFailure(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (R, R, 3)
    width: int  # the original image, as displayed (EXIF orientation applied)
    height: int


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision Resize(size) on PIL: the short side becomes size, the long side truncates."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision CenterCrop(size): left/top rounded as it does."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit scaled down, transparency composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


# what PIL raises for broken files, depending on the format plugin
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError, struct.error)


def _reason(exc: Exception) -> str:
    return "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"


def _open(data: bytes) -> Image.Image:
    if not data:
        raise DecodeFailure("empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeFailure("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        if data.startswith(_MAGIC):
            raise DecodeFailure("corrupt", "an image header, but the image cannot be read") from None
        raise DecodeFailure("not_image", "not a recognised image format") from None
    except _PIL_ERRORS as exc:
        raise DecodeFailure(_reason(exc), str(exc) or type(exc).__name__) from None


def _shrink_jpeg(img: Image.Image, size: int) -> None:
    """DCT-domain downscale to no less than the final resize's size."""
    if img.format != "JPEG":
        return
    short = min(img.size)
    target = resized_size(*img.size, size) if short > 0 else img.size
    img.draft("RGB", (max(target[0], 1), max(target[1], 1)))


def _load(img: Image.Image, size: int) -> Image.Image:
    try:
        _shrink_jpeg(img, size)
        img.load()
        return ImageOps.exif_transpose(img) or img
    except _PIL_ERRORS as exc:
        raise DecodeFailure(_reason(exc), str(exc) or type(exc).__name__) from None


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    new_w, new_h = resized_size(width, height, size)
    left, top, right, bottom = center_box(new_w, new_h, size)
    if max(width, height) / min(width, height) <= MAX_ASPECT:
        return img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, right, bottom))
    scale_x, scale_y = width / new_w, height / new_h
    box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def _display_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a reason to drop the image
        orientation = 1
    return (height, width) if orientation in _EXIF_SWAPS else (width, height)


def decode(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode one encoded image into (size, size, 3) uint8 pixels as CLIP's preprocessing would."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    img = _open(data)
    width, height = _display_size(img)
    if width < 1 or height < 1:
        raise DecodeFailure("corrupt", f"image has size {width}x{height}")
    img = to_rgb(_load(img, size))
    return Decoded(np.asarray(_resize_crop(img, size), dtype=np.uint8), width, height)


def mean_std() -> tuple[np.ndarray, np.ndarray]:
    """CLIP's normalisation constants (what clip.clip._transform uses)."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return mean, std
