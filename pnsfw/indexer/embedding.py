"""The embedding service: images (bytes or files) and texts -> unit vectors in a store's space.

The CLIP encoder the store was built with plus the store's projection, behind one object; `pnsfw predict`,
`search --image/--text`, `explain --image` and the API's uploads all embed through it (search receives it
through its `Encoder` protocol and never imports this stage).
"""

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, SpaceMismatch, StoreError
from ..store import Projection, Store

ENCODE_BATCH = 64


class EmbeddingService:
    """CLIP encoder + projection of one store; thread-compatible (the API calls it from one batcher thread)."""

    def __init__(self, encoder: Any, projection: Projection):
        self.encoder, self.projection = encoder, projection

    @classmethod
    def open(cls, store: Store, clip_model: "str | None" = None, device: str = "auto") -> "EmbeddingService":
        """The encoder the store records (manifest), or `clip_model` if it has the same weights."""
        from .encoder import load_encoder

        recorded = store.encoder
        if not recorded:
            raise StoreError(f"store {store.root} has no vectors yet")
        encoder = load_encoder(clip_model or recorded["name"], device)
        if encoder.fingerprint != recorded["fingerprint"]:
            raise SpaceMismatch(f"CLIP model {encoder.name} ({encoder.fingerprint[:12]}) is not the one store "
                                f"{store.root} was built with ({recorded['name']}, {recorded['fingerprint'][:12]})")
        return cls(encoder, store.projection())

    @property
    def dim(self) -> int:
        return int(self.projection.dim)

    def embed_images(self, images: list[bytes]) -> tuple[np.ndarray, list["str | None"]]:
        """Encoded images -> (vectors (n, dim) float32 with NaN rows where decoding failed, errors: None if ok)."""
        from .decode import DecodeFailure, decode

        ok: list[int] = []
        pixels: list[np.ndarray] = []
        errors: list[str | None] = []
        for i, data in enumerate(images):
            try:
                pixels.append(decode(data, self.encoder.resolution).pixels)
                ok.append(i)
                errors.append(None)
            except DecodeFailure as exc:
                errors.append(str(exc))
        vectors = np.full((len(images), self.dim), np.nan, dtype=np.float32)
        for start in range(0, len(ok), ENCODE_BATCH):
            batch = np.stack(pixels[start:start + ENCODE_BATCH])
            vectors[ok[start:start + ENCODE_BATCH]] = self.projection.apply(self.encoder.encode_pixels(batch))
        return vectors, errors

    def embed_files(self, paths: list[str]) -> tuple[np.ndarray, list["str | None"]]:
        """Image files -> embed_images of their bytes (an unreadable file is an error of its own row)."""
        data: list[bytes] = []
        unreadable: dict[int, str] = {}
        for i, path in enumerate(paths):
            try:
                data.append(Path(path).read_bytes())
            except OSError as exc:
                unreadable[i] = f"unreadable: {exc.strerror}"
                data.append(b"")
        vectors, errors = self.embed_images(data)
        return vectors, [unreadable.get(i, error) for i, error in enumerate(errors)]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> (n, dim) float32 unit vectors via CLIP's text tower and the same projection."""
        if not texts or any(not t.strip() for t in texts):
            raise BadInput("query text must not be empty")
        parts = [self.projection.apply(self.encoder.encode_text(texts[s:s + ENCODE_BATCH]))
                 for s in range(0, len(texts), ENCODE_BATCH)]
        return np.concatenate(parts)

    def embed_image_file(self, path: str) -> np.ndarray:
        """One image file -> (dim,) unit vector; BadInput (one line) when it cannot be read or decoded."""
        vectors, errors = self.embed_files([path])
        if errors[0] is not None:
            raise BadInput(f"cannot use image {path}: {errors[0]}")
        return vectors[0]
