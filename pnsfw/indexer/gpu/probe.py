"""Which files the device decodes: read, hash and probe the JPEG header (in worker processes or threads)."""

import hashlib
import os
import struct
from typing import NamedTuple

from ..decode import MAX_ASPECT
from ..reader import Result, process_chunk
from ..sources import TAR_SEPARATOR, Item

INLINE_BYTES = 128 * 1024  # files up to this size come back through the pool's pipe; larger are read again here
MAX_DEVICE_PIXELS = 40_000_000  # larger images decode on CPU, where the DCT downscale shrinks them first
_SOF = {0xC0, 0xC1, 0xC2}  # Huffman baseline / extended / progressive: what nvJPEG decodes
_BASELINE = {0xC0, 0xC1}  # what its hardware engines decode
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _exif_orientation(data: bytes | bytearray, start: int, end: int) -> int:
    """Orientation tag (0x0112) of a TIFF block inside APP1, or 1."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(data[start:start + 2]))
    if order is None or start + 8 > end:
        return 1
    ifd = start + struct.unpack_from(order + "I", data, start + 4)[0]
    if ifd + 2 > end:
        return 1
    count = struct.unpack_from(order + "H", data, ifd)[0]
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, end - 11), 12):
        if struct.unpack_from(order + "H", data, entry)[0] == 0x0112:
            return struct.unpack_from(order + "H", data, entry + 8)[0]
    return 1


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder handles as the CPU path would, else None."""
    header = jpeg_header(data)
    return header[:2] if header else None


def jpeg_header(data: bytes | bytearray) -> tuple[int, int, bool] | None:
    """(width, height, whether nvJPEG's hardware engines take it: baseline, 3 components) of a JPEG the
    device decoder handles as the CPU path would, else None."""
    if data[:3] != b"\xff\xd8\xff" or data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0:
        return None  # not a JPEG, or truncated (the CPU path reports those)
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            if _exif_orientation(data, pos + 10, min(pos + 2 + length, end)) not in (0, 1):
                return None
        elif marker in _SOF and pos + 10 <= end:
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            plain = data[pos + 4] == 8 and data[pos + 9] in (1, 3)
            hardware = marker in _BASELINE and data[pos + 9] == 3
            return (width, height, hardware) if plain and width and height else None
        elif marker in _OTHER_SOF or marker == 0xDA:
            return None
        pos += 2 + length
    return None


def device_ok(size: tuple[int, int] | None, max_pixels: int) -> bool:
    """Whether an image of this size (None: not a plain JPEG) decodes on the device."""
    if size is None:
        return False
    width, height = size
    return width * height <= min(max_pixels, MAX_DEVICE_PIXELS) and max(size) / min(size) <= MAX_ASPECT


def read_local(item: Item) -> bytearray:
    """The bytes of a file or tar member, into a writable buffer (torch.frombuffer needs one)."""
    path = item.uri.split(TAR_SEPARATOR, 1)[0] if item.offset >= 0 else item.uri
    with open(path, "rb", buffering=0) as f:
        size = item.size if item.offset >= 0 else os.fstat(f.fileno()).st_size
        if item.offset >= 0:
            f.seek(item.offset)
        buf = bytearray(size)
        got = f.readinto(buf)
    return buf if got == size else buf[:got]


def read_probe(item: Item, max_pixels: int) -> tuple[bytearray | None, tuple[int, int, bool] | None]:
    """The bytes of a local JPEG the device decodes, with its jpeg_header; (None, None) for anything else."""
    if item.uri.startswith(("http://", "https://")):
        return None, None
    try:
        buf = read_local(item)
    except OSError:
        return None, None  # the CPU path reads it again and reports why it failed
    header = jpeg_header(buf)
    return (buf, header) if header and device_ok(header[:2], max_pixels) else (None, None)


def probe_row(item: Item, buf: bytes | bytearray, header: tuple[int, int, bool]) -> Result:
    """The row of a file the device decodes (its pixels stay on the device)."""
    return Result(item, None, hashlib.sha256(buf).hexdigest(), header[0], header[1])


class Packed(NamedTuple):
    """What a worker's `read_chunk` sends back: the device's JPEGs end to end in one buffer, the rest decoded."""

    data: bytearray
    rows: list[tuple[int, str, int, int, int, int, bool]]  # (index in the chunk, sha256, width, height, offset
    # in data or -1: read it again, length, whether the hardware engines take it); plain values, not Results:
    # the parent has the items, and unpickling ~1,000 namedtuples a unit held its GIL ~18 us per image
    cpu: list[Result]  # items the device decoder does not take, decoded (or failed) by the CPU path


def read_chunk(items: list[Item], size: int, max_pixels: int, timeout: float) -> Packed:
    """Worker process: read, hash and probe each item; JPEGs for the device come back as bytes, the rest
    is decoded right here by the CPU path (one trip through the pool, and no Python per byte in the parent)."""
    data, rows, cpu = bytearray(), [], []
    for index, item in enumerate(items):
        buf, dims = read_probe(item, max_pixels)
        if buf is None or dims is None:
            cpu.append(item)
            continue
        inline = len(buf) <= INLINE_BYTES
        rows.append((index, hashlib.sha256(buf).hexdigest(), dims[0], dims[1], len(data) if inline else -1,
                     len(buf), dims[2]))
        if inline:
            data += buf
    return Packed(data, rows, process_chunk(cpu, size, max_pixels, timeout))
