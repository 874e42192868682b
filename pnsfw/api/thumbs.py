"""Thumbnails of stored images: 256 px on the long side, JPEG, kept in a bounded in-memory LRU."""

import io
import threading
from collections import OrderedDict

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import NotAnImage

THUMB_PX = 256
QUALITY = 80
CACHE_MB = 64.0


def make_thumb(data: bytes, size: int = THUMB_PX) -> bytes:
    """JPEG bytes of `data` scaled to fit `size` x `size` (EXIF rotation applied, never enlarged)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, far faster for photos
            img = ImageOps.exif_transpose(img)
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            if img.mode != "RGB":
                img = _flatten(img)
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=QUALITY, optimize=True)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise NotAnImage(f"stored image cannot be decoded for a thumbnail: {exc}") from None
    return out.getvalue()


def _flatten(img: Image.Image) -> Image.Image:
    """RGB on white for images with transparency or a palette (JPEG has no alpha)."""
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


class ThumbCache:
    """A thread-safe LRU of thumbnail bytes, bounded by total size; keyed by (id, uri) so a changed item misses."""

    def __init__(self, max_bytes: int = int(CACHE_MB * 1024 * 1024)):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[int, str]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[int, str], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(data) - (len(old) if old is not None else 0)
            self._items[key] = data
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
