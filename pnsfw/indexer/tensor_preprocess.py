"""CLIP preprocessing of decoded image tensors in batches, on any torch device (the GPU path's resize).

PIL's antialiased bicubic resize is separable: each output column is a fixed
weighted sum of input columns, so "resize the short side to R, center-crop R x R"
is `Wy @ X @ Wx^T` with one (R x in) weight matrix per axis that holds only the
cropped outputs. The matrices are built as Pillow builds its coefficients
(bicubic a=-0.5, support scaled by the downscale factor), and the two passes
round and clip to 0..255 in between as Pillow does for 8-bit images, so the
result equals `clip.clip._transform(R)` on the same decoded pixels up to
float rounding (tests/test_gpu_path.py holds the tolerance). Images of a batch
may differ in size: they are zero-padded to the largest, and the padded
columns get zero weight.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from .decode import center_box, mean_std, resized_size

_BICUBIC_A = -0.5
_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_BICUBIC_A + 2) * x - (_BICUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _BICUBIC_A
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def axis_weights(in_size: int, out_size: int, start: int, count: int) -> np.ndarray:
    """(count, in_size) float64: Pillow's coefficients for outputs start..start+count of an in->out resize."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    center = (np.arange(start, start + count) + 0.5)[:, None] * scale
    lo = np.maximum(np.trunc(center - support + 0.5), 0)  # C's (int) truncation, as Pillow does
    hi = np.minimum(np.trunc(center + support + 0.5), in_size)
    x = np.arange(in_size)[None, :]
    taps = np.where((x >= lo) & (x < hi), _bicubic((x - center + 0.5) / filterscale), 0.0)
    total = taps.sum(axis=1, keepdims=True)
    return taps / np.where(total != 0, total, 1.0)


def crop_weights(width: int, height: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(Wx (size, width), Wy (size, height)) for Resize(size) + CenterCrop(size) of a width x height image."""
    new_w, new_h = resized_size(width, height, size)
    left, top, _, _ = center_box(new_w, new_h, size)
    return axis_weights(width, new_w, left, size), axis_weights(height, new_h, top, size)


def _to_device(values: np.ndarray, device: Any) -> Any:
    """A host array on `device` without a synchronising copy (pageable copies wait for the stream's queued work,
    the decode or the tower): through page-locked memory, asynchronously."""
    import torch

    host = torch.from_numpy(values)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _batch_axis_weights(in_sizes: np.ndarray, out_sizes: np.ndarray, starts: np.ndarray, count: int, pad: int,
                        device: Any, dtype: Any) -> Any:
    """(B, count, pad) weights of one axis for a whole batch, built with a fixed number of tensor ops.

    Same formula as `axis_weights` (Pillow's); per-image values in float64, taps in float32. Only each output's
    window of taps (at most 2 x support + 1 inputs) is computed, then scattered into the zero matrix: the
    elementwise work over every (output, input) pair cost ~15 ms of GPU time per 1024 thumbnails."""
    import torch

    columns = _to_device(np.stack([in_sizes, in_sizes / out_sizes, starts]).astype(np.float64), device)
    in_size, scale, start = (c.view(-1, 1, 1) for c in columns)
    filterscale = scale.clamp(min=1.0)
    support = _SUPPORT * filterscale
    center = (start + torch.arange(count, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    lo = torch.trunc(center - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), in_size)
    window = int(np.ceil(2 * _SUPPORT * max(float((in_sizes / out_sizes).max(initial=1.0)), 1.0))) + 2
    x = lo + torch.arange(window, device=device, dtype=torch.float64).view(1, 1, -1)  # (B, count, window)
    t = ((x - center + 0.5) / filterscale).abs().float()
    a = _BICUBIC_A
    taps = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1, torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a,
                                                                               torch.zeros_like(t)))
    taps = torch.where(x < hi, taps, torch.zeros_like(taps))
    total = taps.sum(dim=2, keepdim=True)
    taps = taps / torch.where(total != 0, total, torch.ones_like(total))
    out = torch.zeros((len(in_sizes), count, pad), dtype=dtype, device=device)
    # taps past hi weigh 0: clamped onto the last column they add nothing
    return out.scatter_add_(2, x.clamp(max=pad - 1).long(), taps.to(dtype))


def _axis_keys(shapes: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """(2B, 3) float64 (input size, resized size, crop start) of every image's width, then every height."""
    heights = np.array([h for h, _ in shapes], np.float64)
    widths = np.array([w for _, w in shapes], np.float64)
    resized = np.array([resized_size(int(w), int(h), size) for h, w in shapes], np.float64)
    lefts = np.round((resized[:, 0] - size) / 2.0)  # center_box's rounding (round half to even, as round())
    tops = np.round((resized[:, 1] - size) / 2.0)
    return np.stack([np.concatenate([widths, heights]), np.concatenate([resized[:, 0], resized[:, 1]]),
                     np.concatenate([lefts, tops])], axis=1)


WEIGHT_CACHE_BYTES = 1 << 31  # at most, per (device, dtype, size), and 2 % of a GPU's memory: at fp16, R = 224
# and 448 px wide rows, 10,700 axes (an H200), 1,300 on a 16 GB GPU
WEIGHT_CACHE_SHARE = 0.02


def _cache_budget(device: Any) -> int:
    import torch

    if torch.device(device).type != "cuda":
        return WEIGHT_CACHE_BYTES
    return min(WEIGHT_CACHE_BYTES, int(WEIGHT_CACHE_SHARE * torch.cuda.get_device_properties(device).total_memory))


class WeightCache:
    """Axis weights by (input size, resized size, crop start), kept on the device in one (n, R, pad) table: a
    unit's weights are then one gather (two ops and one small copy) instead of ~40 ops, each of which waits
    for the GIL behind the pipeline's other threads (an H200 decode thread spent ~30-45 ms a unit of 1024
    thumbnails on them, session 9). Rows are computed once, for the keys a unit brings that are new. It pays
    where sizes repeat (img2dataset's fixed-size or fixed-side downloads); a unit wider than the table, or
    whose new keys overflow the budget, starts the table afresh, and one that alone does not fit is computed
    directly, so a run never costs more ops than without it. Thread-safe; the table's rows are complete on the
    device before any other thread may read them."""

    def __init__(self, size: int, device: Any, dtype: Any):
        import threading

        self.size, self.device, self.dtype = size, device, dtype
        self.rows: dict[tuple[float, float, float], int] = {}
        self.table: Any = None  # (capacity, size, pad)
        self.budget = _cache_budget(device)
        self.lock = threading.Lock()

    def _grow(self, needed: int, pad: int) -> bool:
        """Room for `needed` rows at least `pad` wide; False: past the budget."""
        import torch

        width = self.table.shape[2] if self.table is not None else -(-pad // 64) * 64
        capacity = self.table.shape[0] if self.table is not None else 0
        if needed <= capacity:
            return True
        row_bytes = self.size * width * torch.finfo(self.dtype).bits // 8
        capacity = next((c for c in (max(needed, 2 * capacity, 256), needed) if c * row_bytes <= self.budget), 0)
        if not capacity:
            return False
        table = torch.zeros((capacity, self.size, width), dtype=self.dtype, device=self.device)
        if self.table is not None:
            table[:len(self.rows)] = self.table[:len(self.rows)]
        self.table = table
        return True

    def lookup(self, keys: np.ndarray, pad: int) -> Any:
        """(len(keys), R, pad) weights, or None when they do not fit the cache."""
        import torch

        wanted = [tuple(k) for k in keys.tolist()]
        with self.lock:
            if self.table is not None and pad > self.table.shape[2]:  # a wider unit: the table starts afresh
                self.rows, self.table = {}, None
            new = list(dict.fromkeys(k for k in wanted if k not in self.rows))
            if not self._grow(len(self.rows) + len(new), pad):
                self.rows, self.table = {}, None  # full: afresh with this unit's keys, if they alone fit
                new = list(dict.fromkeys(wanted))
                if not self._grow(len(new), pad):
                    return None
            if new:
                fresh = np.array(new, np.float64)
                start = len(self.rows)
                self.table[start:start + len(new)] = _batch_axis_weights(
                    fresh[:, 0], fresh[:, 1], fresh[:, 2], self.size, self.table.shape[2], self.device, self.dtype)
                if self.table.is_cuda:  # other threads' streams read these rows as soon as they are listed
                    torch.cuda.current_stream(self.device).synchronize()
                self.rows.update((k, start + i) for i, k in enumerate(new))
            table = self.table
            index = np.fromiter((self.rows[k] for k in wanted), np.int64, len(wanted))
        picked = table.index_select(0, _to_device(index, self.device))[:, :, :pad]
        if table.is_cuda:  # a table replaced meanwhile stays allocated until this stream has read it
            table.record_stream(torch.cuda.current_stream(self.device))
        return picked


_CACHES: dict[tuple[str, Any, int], WeightCache] = {}


def _weight_cache(size: int, device: Any, dtype: Any) -> WeightCache:
    key = (str(device), dtype, size)
    if key not in _CACHES:
        _CACHES.setdefault(key, WeightCache(size, device, dtype))
    return _CACHES[key]


def _stacked_weights(shapes: Sequence[tuple[int, int]], size: int, pad_h: int, pad_w: int, device: Any,
                     dtype: Any) -> tuple[Any, Any]:
    """Weights of every image, zero beyond its own size: (B, 1, Wmax, R) and (B, 1, R, Hmax).

    Both axes in one pass (widths then heights), from the device's WeightCache or, past it, built on the
    device for the whole batch at once: the op count does not grow with the batch (per-image ops would each
    release and re-take the GIL, and in the pipeline each op waits for it behind the other threads)."""
    keys = _axis_keys(shapes, size)
    pad = max(pad_h, pad_w)
    both = _weight_cache(size, device, dtype).lookup(keys, pad)
    if both is None:
        both = _batch_axis_weights(keys[:, 0], keys[:, 1], keys[:, 2], size, pad, device, dtype)
    count = len(shapes)
    return both[:count, :, :pad_w].transpose(1, 2)[:, None], both[count:, :, :pad_h][:, None]


def _padded(images: Sequence[Any], dtype: Any) -> Any:
    """(B, 3, Hmax, Wmax) of `dtype`; one copy kernel when every image has the same shape."""
    import torch

    if all(img.shape == images[0].shape for img in images):
        return torch.stack(list(images)).to(dtype)
    pad_h = max(int(img.shape[1]) for img in images)
    pad_w = max(int(img.shape[2]) for img in images)
    batch = torch.zeros((len(images), 3, pad_h, pad_w), dtype=dtype, device=images[0].device)
    for i, img in enumerate(images):
        batch[i, :, :img.shape[1], :img.shape[2]] = img
    return batch


def resize_crop(images: Sequence[Any], size: int, dtype: Any = None) -> Any:
    """uint8 (3, H_i, W_i) tensors on one device -> float (B, 3, size, size) pixel values 0..255 (integers).

    `dtype` is the matmul dtype: float32 by default; float16 on CUDA is exact for
    uint8 inputs and accumulates in float32, and ends within one level of float32.
    """
    import torch

    dtype = dtype or torch.float32
    shapes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
    return resize_padded(_padded(images, dtype), shapes, size, dtype)


def resize_padded(batch: Any, shapes: Sequence[tuple[int, int]], size: int, dtype: Any = None) -> Any:
    """(B, 3, Hmax, Wmax) images, each top-left in its slot with its (H, W) in `shapes` (whatever lies beyond
    gets zero weight; uint8 or float) -> float (B, 3, size, size) 0..255, as `resize_crop`: a fixed number of
    ops whatever the batch."""
    import torch

    dtype = dtype or torch.float32
    batch = batch.to(dtype)
    wx, wy = _stacked_weights(shapes, size, batch.shape[2], batch.shape[3], batch.device, dtype)
    rows = torch.matmul(batch, wx).round_().clamp_(0, 255)  # horizontal pass, stored as 8-bit by Pillow
    return torch.matmul(wy, rows).float().round_().clamp_(0, 255)


def normalize(pixels: Any, channels_last: bool = False) -> Any:
    """0..255 pixels (B, 3, R, R), or uint8 (B, R, R, 3) with channels_last -> CLIP-normalised float32."""
    if channels_last:
        pixels = pixels.permute(0, 3, 1, 2)
    mean, std = _mean_std_on(pixels.device)
    return (pixels.float() / 255.0 - mean) / std


_ON_DEVICE: dict[Any, tuple[Any, Any]] = {}


def _mean_std_on(device: Any) -> tuple[Any, Any]:
    """CLIP's (1, 3, 1, 1) mean and std on `device`, made once (a copy per batch would synchronise it)."""
    if device not in _ON_DEVICE:
        import torch

        mean, std = (torch.as_tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std())
        _ON_DEVICE[device] = (mean, std)
    return _ON_DEVICE[device]


def clip_preprocess(images: Sequence[Any], size: int, dtype: Any = None) -> Any:
    """uint8 (3, H_i, W_i) tensors -> CLIP-normalised (B, 3, size, size) float32, like clip's transform."""
    return normalize(resize_crop(images, size, dtype))
