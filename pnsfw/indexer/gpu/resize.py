"""Where the batched resize/crop runs (decode thread, encoder thread or a thread of its own), and on which stream."""

import queue
import threading
from contextlib import nullcontext
from typing import Any

from ..reader import Result
from .route import Decoded

# auto: on the encoding thread for units of large images, whose nvJPEG decode already fills the decode thread
# (2 MP photos: 4,700 vs 3,700 img/s steady on an H100), on the decode thread for small ones (400 px
# thumbnails: 7,500 vs 5,500).
RESIZE_LATER_FROM_PIXELS = 1_000_000  # mean pixels per image of a unit


def resize_later(rows: list[Result], mode: str) -> bool:
    """Whether the decode thread leaves the resize to a later thread (the resize thread, or the encoder's)."""
    if mode != "auto":
        return mode in ("encoder", "thread")
    return sum(r.width * r.height for r in rows) >= RESIZE_LATER_FROM_PIXELS * len(rows)


def resize_dtype(device: str) -> Any:
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def device_pixels(decoded: Any, device: str, size: int) -> Any:
    """The device part's (n, 3, R, R) pixels of a Decoded on this thread's stream (resized here when the
    decode thread left that to this one)."""
    import torch

    from ..tensor_preprocess import resize_crop

    pixels = decoded.pixels
    tensors = pixels if isinstance(pixels, list) else [pixels]
    if decoded.event is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(decoded.event)
        for tensor in tensors:  # made on the decode thread's stream: not to be reused before this one is done
            tensor.record_stream(stream)
    return resize_crop(pixels, size, resize_dtype(device)) if isinstance(pixels, list) else pixels


def put(out: queue.Queue, value: Any, stop: threading.Event) -> bool:
    """Put unless `stop` is set first; whether it was put."""
    while not stop.is_set():
        try:
            out.put(value, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def resize_thread(inbox: queue.Queue, out: queue.Queue, stop: threading.Event, device: str, size: int) -> None:
    """Between decode and encode (resize "thread"): resizes each unit on its own stream, so nvJPEG's host
    work, the resize's per-image ops and the encoder's launches run on three threads."""
    import torch

    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    try:
        with torch.cuda.stream(stream) if stream else nullcontext():
            while isinstance(value := inbox.get(), Decoded):
                if isinstance(value.pixels, list):
                    pixels = device_pixels(value, device, size)
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record()
                    value = Decoded(value.prepared, pixels, event)
                if not put(out, value, stop):
                    return
        put(out, value, stop)  # None (the end) or the decode thread's exception
    except BaseException as exc:
        put(out, exc, stop)
