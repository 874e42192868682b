"""What every way into a store takes (`pnsfw index` from images, `pnsfw import` from embeddings)."""

from dataclasses import dataclass


@dataclass
class IngestOptions:
    """The space (--model, --projection), the uri column of table sources, and how rows are committed."""

    model: str | None = None  # None: the store's own encoder (a new store: each command's default)
    projection: str | None = None  # None: the store's, or each command's default for a new store
    uri_column: str | None = None  # of Parquet/CSV sources; None: uri, url or image_path
    shard_size: int = 50_000
    pca_rows: int = 10_000  # rows a `pca` projection is fitted on
    seed: int = 0  # of a `random` projection
