"""Thumbnails and the review/label endpoints against a real `pnsfw serve` (tests/api_server.py)."""

import io

from api_server import Server
from PIL import Image

from pnsfw.api.thumbs import ThumbCache, make_thumb


def test_thumb_is_a_small_jpeg_behind_the_token(api_server: Server) -> None:
    with api_server.client() as client:
        uri = client.get("/v1/items/3").json()["uri"]
        original = Image.open(uri)
        response = client.get("/v1/items/3/thumb")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.content))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
        assert thumb.size[0] / thumb.size[1] == original.size[0] / original.size[1]
        assert client.get("/v1/items/3/thumb").content == response.content  # from the cache
        assert client.get("/v1/items/999999/thumb").status_code == 404
        assert client.get("/v1/items/-1/thumb").status_code == 422
    with api_server.client(token=None) as anonymous:
        assert anonymous.get("/v1/items/3/thumb").status_code == 401


def test_thumb_of_a_large_image_fits_256_px() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (1200, 600), (10, 200, 30, 128)).save(buffer, format="PNG")
    thumb = Image.open(io.BytesIO(make_thumb(buffer.getvalue())))
    assert thumb.size == (256, 128) and thumb.mode == "RGB"


def test_thumb_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = ThumbCache(max_bytes=250)
    for i in range(3):
        cache.put((i, "u"), bytes(100))
    assert len(cache) == 2 and cache.get((0, "u")) is None and cache.bytes == 200
    cache.get((1, "u"))
    cache.put((3, "u"), bytes(100))
    assert cache.get((2, "u")) is None and cache.get((1, "u")) is not None
