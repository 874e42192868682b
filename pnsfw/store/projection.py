"""The embedding space (256-d by default, or the raw width): an affine map of L2-normalised CLIP features,
then L2 normalisation.

Saved as one .npy of shape (width + 1, dim): the matrix, then a bias row
(zero for `random`, -mean @ W for `pca`).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    out: np.ndarray = x / np.maximum(norm, 1e-12)
    return out


@dataclass(frozen=True)
class Projection:
    matrix: np.ndarray
    bias: np.ndarray
    kind: str

    @property
    def width(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.packed().tobytes())
        return digest.hexdigest()[:16]

    def packed(self) -> np.ndarray:
        return np.vstack([self.matrix, self.bias[None, :]]).astype(np.float32)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """CLIP features (n, width) -> unit vectors (n, dim), float32."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.width:
            raise BadInput(f"expected features of width {self.width}, got shape {features.shape}")
        if self.kind == "none":  # the identity: skip a (width x width) matmul
            return l2_normalize(features)
        return l2_normalize(l2_normalize(features) @ self.matrix + self.bias)

    def save(self, path: Path) -> None:
        from .files import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, self.packed())

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: Path, kind: str = "file") -> "Projection":
        try:
            packed = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read projection {path}: {exc}") from None
        if packed.ndim != 2 or packed.shape[0] < 2:
            raise BadInput(f"projection {path} must be a 2-d array (width[+1], dim), got {packed.shape}")
        return cls.from_array(packed, kind)

    @classmethod
    def from_array(cls, packed: np.ndarray, kind: str) -> "Projection":
        """Accept (width, dim) or (width + 1, dim) with a bias row; width is a multiple of 64."""
        packed = np.asarray(packed, dtype=np.float32)
        if packed.shape[0] % 64 == 1:
            return cls(packed[:-1], packed[-1], kind)
        return cls(packed, np.zeros(packed.shape[1], np.float32), kind)


def space_fingerprint(encoder_fingerprint: str, projection_fingerprint: str) -> str:
    """One id for 'vectors from this CLIP model through this projection'."""
    return hashlib.sha256(f"{encoder_fingerprint}:{projection_fingerprint}".encode()).hexdigest()[:16]
