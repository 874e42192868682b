"""Images and texts -> unit vectors in a store's space (CLIP encoder + the store's projection)."""

from typing import Any

import numpy as np

from ..errors import BadInput, SpaceMismatch, StoreError
from ..store import Projection, Store

ENCODE_BATCH = 64


def load_store_encoder(store: Store, clip_model: "str | None" = None, device: str = "auto") -> Any:
    """The CLIP encoder the store was built with (manifest name), or `clip_model` if it has the same weights."""
    from ..indexer.encoder import load_encoder

    recorded = store.manifest.get("encoder")
    if not recorded:
        raise StoreError(f"store {store.root} has no vectors yet")
    encoder = load_encoder(clip_model or recorded["name"], device)
    if encoder.fingerprint != recorded["fingerprint"]:
        raise SpaceMismatch(f"CLIP model {encoder.name} ({encoder.fingerprint[:12]}) is not the one store "
                            f"{store.root} was built with ({recorded['name']}, {recorded['fingerprint'][:12]})")
    return encoder


def _decode_all(encoder: Any, images: list[bytes]) -> tuple[list[int], list[np.ndarray], list["str | None"]]:
    from ..indexer.decode import DecodeFailure, decode

    ok, pixels, errors = [], [], []
    for i, data in enumerate(images):
        try:
            pixels.append(decode(data, encoder.resolution).pixels)
            ok.append(i)
            errors.append(None)
        except DecodeFailure as exc:
            errors.append(str(exc))
    return ok, pixels, errors


def embed_images(encoder: Any, projection: Projection, images: list[bytes]) -> tuple[np.ndarray, list["str | None"]]:
    """Encoded images -> (vectors (n, dim) float32, NaN rows where decoding failed; errors, None where ok)."""
    ok, pixels, errors = _decode_all(encoder, images)
    vectors = np.full((len(images), projection.dim), np.nan, dtype=np.float32)
    for start in range(0, len(ok), ENCODE_BATCH):
        batch = np.stack(pixels[start:start + ENCODE_BATCH])
        vectors[ok[start:start + ENCODE_BATCH]] = projection.apply(encoder.encode_pixels(batch))
    return vectors, errors


def embed_image(encoder: Any, projection: Projection, data: bytes, name: str = "image") -> np.ndarray:
    """One encoded image -> (dim,) unit vector; BadInput when it cannot be decoded."""
    vectors, errors = embed_images(encoder, projection, [data])
    if errors[0] is not None:
        raise BadInput(f"cannot decode {name}: {errors[0]}")
    return vectors[0]


def embed_texts(encoder: Any, projection: Projection, texts: list[str]) -> np.ndarray:
    """Strings -> (n, dim) float32 unit vectors via CLIP's text tower and the same projection."""
    if not texts or any(not t.strip() for t in texts):
        raise BadInput("query text must not be empty")
    parts = [projection.apply(encoder.encode_text(texts[s:s + ENCODE_BATCH]))
             for s in range(0, len(texts), ENCODE_BATCH)]
    return np.concatenate(parts)


def _read_vector(path: str, dim: int) -> np.ndarray:
    try:
        vector = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read vector file {path}: {exc}") from None
    vector = np.asarray(vector, dtype=np.float32).reshape(-1) if np.size(vector) == dim else None
    if vector is None or not np.isfinite(vector).all():
        raise BadInput(f"{path} must hold one finite vector of {dim} values (shape ({dim},) or (1, {dim}))")
    return vector


def query_vector(store: Store, *, image: "str | None" = None, text: "str | None" = None,
                 vector_file: "str | None" = None, clip_model: "str | None" = None,
                 device: str = "auto") -> np.ndarray:
    """The (dim,) query vector for an image file, a text or a .npy file."""
    if vector_file is not None:
        return _read_vector(vector_file, store.dim)
    encoder = load_store_encoder(store, clip_model, device)
    if text is not None:
        return embed_texts(encoder, store.projection(), [text])[0]
    try:
        with open(image, "rb") as f:  # type: ignore[arg-type]
            data = f.read()
    except OSError as exc:
        raise BadInput(f"cannot read image {image}: {exc.strerror}") from None
    return embed_image(encoder, store.projection(), data, str(image))
