"""What search is handed by cli and api (DESIGN §1): it never imports pnsfw.classifier or pnsfw.indexer."""

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np


class Scorer(Protocol):
    """A classifier of the store's space (pnsfw.classifier.scorer.StoreScorer)."""

    name: str
    nsfw_classes: list[str]

    def p_nsfw(self, vectors: np.ndarray) -> np.ndarray:
        """(n, dim) -> (n,) float32."""

    def verdicts(self, vectors: np.ndarray) -> list[dict[str, Any]]:
        """(n, dim) -> one verdict dict per row (pnsfw.classifier.verdict)."""

    def stored_p_nsfw(self, ids: np.ndarray) -> np.ndarray:
        """Bulk scores of these store ids, NaN where there is none."""

    def stored_parts(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, p_nsfw) of each part of the bulk scores, one part at a time."""

    def training_labels(self) -> dict[int, str]:
        """id -> label of the examples the model was trained on."""

    def labelled_examples(self) -> tuple[np.ndarray, list[str]]:
        """Ids and labels of the training split."""


class Encoder(Protocol):
    """Images and texts -> unit vectors in the store's space (pnsfw.indexer.embedding.EmbeddingService)."""

    def embed_images(self, images: list[bytes]) -> tuple[np.ndarray, list["str | None"]]:
        """Encoded images -> (vectors, NaN rows where undecodable; per-image error or None)."""

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (n, dim) unit vectors."""

    def embed_image_file(self, path: str) -> np.ndarray:
        """One image file -> (dim,) unit vector; BadInput when it cannot be used."""
