"""Preprocessing against CLIP's reference transform, and every odd or bad file."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pnsfw.indexer.decode import DecodeFailure, decode, mean_std

RES = 224


def reference(img: Image.Image, size: int = RES) -> np.ndarray:
    """clip.load(...)[1]: the transform CLIP itself applies (CHW, normalised)."""
    from clip.clip import _transform

    return _transform(size)(img).numpy()


def ours(data: bytes, size: int = RES) -> np.ndarray:
    pixels = decode(data, size).pixels.astype(np.float32) / 255.0
    mean, std = mean_std()
    return ((pixels - mean) / std).transpose(2, 0, 1)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus texture: a photo-like image (not flat, not pure noise)."""
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)
    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(base, np.float32) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (224, 224), (101, 77), (1000, 333), (37, 90)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_lossless_matches_reference_within_float_tolerance(size, mode):
    img = photo(*size, mode=mode)
    data = encoded(img, "PNG")
    expected = reference(Image.open(io.BytesIO(data)))
    np.testing.assert_allclose(ours(data), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(1632, 1224), (800, 600), (400, 300)])
def test_jpeg_dct_downscale_stays_close_to_reference(size):
    """DCT-domain shrinking is not bit-exact; it must stay within a few grey levels on average."""
    data = encoded(photo(*size), "JPEG", quality=92)
    diff = np.abs(ours(data) - reference(Image.open(io.BytesIO(data))))
    scale = 0.27 * 255  # one normalised unit is ~69 grey levels
    assert diff.mean() * scale < 3.0
    assert np.percentile(diff, 99) * scale < 20.0


def test_resolution_comes_from_argument():
    assert decode(encoded(photo(64, 48), "PNG"), 32).pixels.shape == (32, 32, 3)


def test_exif_orientation_applied():
    img = photo(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    result = decode(encoded(img, "JPEG", exif=exif), 32)
    assert (result.width, result.height) == (40, 80)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header that claims a huge canvas (PIL refuses it before allocating)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _odd_images() -> dict[str, bytes]:
    rgb = photo(120, 90)
    sixteen = Image.fromarray((np.linspace(0, 65535, 90 * 120).reshape(90, 120)).astype(np.uint16))
    frames = [photo(60, 40, seed=s) for s in range(3)]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=50)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    return {
        "cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
        "16bit": encoded(sixteen, "PNG"),
        "palette": encoded(rgb.convert("P"), "PNG"),
        "alpha": encoded(rgba, "PNG"),
        "animated": anim.getvalue(),
        "tall": encoded(photo(20, 3000), "PNG"),
        "wide": encoded(photo(5000, 4), "JPEG"),
        "tiny": encoded(photo(2, 3), "PNG"),
        "webp": encoded(rgb, "WEBP"),
        "grey_jpeg": encoded(rgb.convert("L"), "JPEG"),
    }


@pytest.mark.parametrize("name", sorted(_odd_images()))
def test_odd_but_valid_images_decode(name):
    result = decode(_odd_images()[name], 32)
    assert result.pixels.shape == (32, 32, 3) and result.pixels.dtype == np.uint8
    assert result.width > 0 and result.height > 0


def test_sixteen_bit_is_scaled_not_clipped():
    sixteen = Image.fromarray(np.full((40, 40), 32768, np.uint16))
    pixels = decode(encoded(sixteen, "PNG"), 32).pixels
    assert 120 <= pixels.mean() <= 135  # half grey, not white


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert decode(encoded(clear, "PNG"), 32).pixels.min() == 255


def _bad_files() -> dict[str, tuple[bytes, str]]:
    jpeg = encoded(photo(200, 150), "JPEG")
    png = encoded(photo(200, 150), "PNG")
    return {
        "empty": (b"", "empty"),
        "text": (b"hello, I am not an image\n" * 10, "not_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_png": (png[: len(png) // 2], "truncated"),
        "bomb": (_bomb_png(60000, 60000), "decompression_bomb"),
        "header_only": (jpeg[:20], "corrupt"),
    }


@pytest.mark.parametrize("name", sorted(_bad_files()))
def test_bad_files_fail_with_a_reason(name):
    data, reason = _bad_files()[name]
    with pytest.raises(DecodeFailure) as info:
        decode(data, 32)
    assert info.value.reason == reason, str(info.value)
