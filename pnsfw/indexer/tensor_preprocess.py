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

from functools import lru_cache
from typing import Any, Sequence

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


@lru_cache(maxsize=2048)
def _device_weights(height: int, width: int, size: int, device: Any, dtype: Any) -> tuple[Any, Any]:
    """Wx^T (W, R) and Wy (R, H) of one image shape, on the device (cached: corpora repeat shapes)."""
    import torch

    wx, wy = crop_weights(width, height, size)
    return (torch.from_numpy(wx.T.astype(np.float32)).to(device, dtype),
            torch.from_numpy(wy.astype(np.float32)).to(device, dtype))


def _stacked_weights(shapes: Sequence[tuple[int, int]], size: int, pad_h: int, pad_w: int, device: Any,
                     dtype: Any) -> tuple[Any, Any]:
    """Weights of every image, zero-padded to the batch's largest: (B|1, 1, W, R) and (B|1, 1, R, H).

    Built once per distinct shape on the device and gathered, so a batch costs a
    few small copies, not B host-side matrices."""
    import torch

    unique = sorted(set(shapes))
    if len(unique) == 1:
        wx, wy = _device_weights(*unique[0], size, device, dtype)
        return wx[None, None], wy[None, None]
    wx = torch.zeros((len(unique), pad_w, size), dtype=dtype, device=device)
    wy = torch.zeros((len(unique), size, pad_h), dtype=dtype, device=device)
    for i, (height, width) in enumerate(unique):
        wx[i, :width], wy[i, :, :height] = _device_weights(height, width, size, device, dtype)
    position = {shape: i for i, shape in enumerate(unique)}
    index = torch.tensor([position[s] for s in shapes], device=device)
    return wx[index][:, None], wy[index][:, None]


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
    device = images[0].device
    batch = _padded(images, dtype)
    shapes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
    wx, wy = _stacked_weights(shapes, size, batch.shape[2], batch.shape[3], device, dtype)
    rows = torch.matmul(batch, wx).round_().clamp_(0, 255)  # horizontal pass, stored as 8-bit by Pillow
    return torch.matmul(wy, rows).float().round_().clamp_(0, 255)


def normalize(pixels: Any, channels_last: bool = False) -> Any:
    """0..255 pixels (B, 3, R, R), or uint8 (B, R, R, 3) with channels_last -> CLIP-normalised float32."""
    import torch

    if channels_last:
        pixels = pixels.permute(0, 3, 1, 2)
    mean, std = (torch.as_tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in mean_std())
    return (pixels.float() / 255.0 - mean) / std


def clip_preprocess(images: Sequence[Any], size: int, dtype: Any = None) -> Any:
    """uint8 (3, H_i, W_i) tensors -> CLIP-normalised (B, 3, size, size) float32, like clip's transform."""
    return normalize(resize_crop(images, size, dtype))
