"""Make the projection: `random` (seeded orthogonal, to 256-d), `pca` (fitted on the first N), `none` (the raw
CLIP width), or a file."""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..store import StoreWriter
from ..store.projection import Projection, l2_normalize

DIM = 256


def random_projection(width: int, dim: int = DIM, seed: int = 0) -> Projection:
    """Data-independent: the same model and seed give the same space in every store."""
    gaussian = np.random.default_rng(seed).standard_normal((width, dim))
    q, r = np.linalg.qr(gaussian)
    q *= np.sign(np.diag(r))  # makes the factorisation unique, so the matrix is reproducible
    return Projection(q.astype(np.float32), np.zeros(dim, np.float32), "random")


def pca_projection(features: np.ndarray, dim: int = DIM) -> Projection:
    """Principal axes of the L2-normalised sample; the bias row centres it."""
    sample = l2_normalize(features).astype(np.float64)
    if len(sample) < 2:
        raise BadInput(f"--projection pca needs at least 2 images to fit, got {len(sample)}")
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    axes = np.zeros((sample.shape[1], dim))
    count = min(dim, vt.shape[0])
    axes[:, :count] = vt[:count].T
    if count < dim:  # fewer samples than dims: pad with orthogonal directions so no output axis is dead
        axes[:, count:] = random_projection(sample.shape[1], dim - count).matrix
    return Projection(axes.astype(np.float32), (-mean @ axes).astype(np.float32), "pca")


def identity_projection(width: int) -> Projection:
    """`--projection none`: the raw CLIP space (unit vectors of the encoder's own width)."""
    return Projection(np.eye(width, dtype=np.float32), np.zeros(width, np.float32), "none")


def needs_sample(spec: str) -> bool:
    return spec == "pca"


def make_projection(spec: str, width: int, sample: np.ndarray | None = None, seed: int = 0) -> Projection:
    """Build the projection named by --projection (random | pca | FILE)."""
    makers: dict[str, Callable[[], Projection]] = {
        "random": lambda: random_projection(width, DIM, seed),
        "pca": lambda: pca_projection(sample if sample is not None else np.zeros((0, width)), DIM),
        "none": lambda: identity_projection(width),
    }
    if spec in makers:
        return makers[spec]()
    if not os.path.isfile(spec):
        raise BadInput(f"--projection must be random, pca, none or a .npy file; {spec!r} is none of these")
    projection = Projection.load(Path(spec), "file")
    if projection.width != width:
        raise BadInput(f"projection {spec} maps width {projection.width}, but the model's embeddings have "
                       f"width {width}")
    return projection


def check_projection_option(writer: StoreWriter, spec: str | None) -> None:
    """An explicit --projection must agree with the one an existing store already uses."""
    if not spec or not writer.store.projection_info:
        return
    current = writer.store.projection()
    same_file = os.path.isfile(spec) and Projection.load(Path(spec)).fingerprint == current.fingerprint
    if spec != current.kind and not same_file:
        raise BadInput(f"store {writer.store.root} already uses a {current.kind} projection; "
                       f"drop --projection or use another --store")
