"""Reading the stored image of an item: only uris the store lists (files and tar members), never a client path."""

import io
import os
import tarfile
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import NotFound
from ..indexer.sources import TAR_SEPARATOR, Item, read_bytes


def _tar_item(uri: str) -> Item:
    path, member = uri.split(TAR_SEPARATOR, 1)
    try:
        with tarfile.open(path) as tar:
            info = tar.getmember(member)
    except (OSError, tarfile.TarError, KeyError):
        raise NotFound(f"image {uri} is no longer readable") from None
    return Item(uri, path, info.offset_data, info.size)


def read_store_image(uri: str) -> tuple[bytes, str]:
    """The bytes and media type of a stored image; 404 for remote URLs and files that are gone."""
    if uri.startswith(("http://", "https://")):
        raise NotFound(f"image {uri} is remote; this server does not fetch it (open the uri)")
    item = _tar_item(uri) if TAR_SEPARATOR in uri else Item(uri, os.path.dirname(uri))
    try:
        data = read_bytes(item)
    except OSError:
        raise NotFound(f"image {uri} is no longer readable") from None
    return data, media_type(data)


def media_type(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


def jsonable(value: Any) -> Any:
    """Numpy scalars and arrays in item metadata -> plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
