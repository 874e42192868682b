"""`pnsfw filter`: the ids and uris kept by a threshold on the bulk scores, to Parquet, CSV or a uri list."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import BadInput, StoreError
from ..store import Store
from ..store import shards as shard_io
from ..store.files import atomic_write
from .model import DEFAULT_NAME, read_meta
from .scoring import score_store, scored_parts, scores_dir


def _write_parquet(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _write_csv(table: pa.Table, path: Path) -> None:
    import pyarrow.csv as pcsv

    atomic_write(path, lambda tmp: pcsv.write_csv(table, tmp))


def _write_txt(table: pa.Table, path: Path) -> None:
    lines = "".join(f"{uri}\n" for uri in table.column("uri").to_pylist())
    atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


WRITERS: dict[str, Callable[[pa.Table, Path], None]] = {
    ".parquet": _write_parquet, ".pq": _write_parquet, ".csv": _write_csv, ".txt": _write_txt}
KEEP: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "safe": lambda p, t: p < t, "unsafe": lambda p, t: p >= t}


@dataclass
class FilterSummary:
    kept: int
    dropped: int
    threshold: float
    keep: str
    out: str
    newly_scored: int


def _kept_rows(store: Store, folder: Path, part: str, keep: str, threshold: float) -> pa.Table:
    rows = shard_io.read_table(store.root / "shards" / part, ["id", "uri"])
    scores = shard_io.read_table(folder / part, ["id", "p_nsfw"])
    if not rows.column("id").equals(scores.column("id")):
        raise StoreError(f"scores {folder / part} do not match shard {part}; rerun `pnsfw score`")
    p = scores.column("p_nsfw").to_numpy()
    mask = pa.array(KEEP[keep](p, threshold))
    return pa.table({"id": rows.column("id"), "uri": rows.column("uri"), "p_nsfw": scores.column("p_nsfw")}).filter(mask)


def filter_store(store_root: "str | Path", out: "str | Path", name: str = DEFAULT_NAME,
                 threshold: float | None = None, keep: str = "safe") -> FilterSummary:
    """Score any unscored shards, then write the rows with p_nsfw < T (safe) or >= T (unsafe) to OUT."""
    out = Path(out)
    writer = WRITERS.get(out.suffix.lower())
    if writer is None:
        raise BadInput(f"--out {out}: use a .parquet, .csv or .txt file")
    if keep not in KEEP:
        raise BadInput(f"--keep {keep!r}: use safe or unsafe")
    scored = score_store(store_root, name).scored
    store = Store.open(store_root)
    threshold = float(read_meta(store, name)["threshold"] if threshold is None else threshold)
    folder = scores_dir(store, name)
    parts = [_kept_rows(store, folder, part, keep, threshold) for part in scored_parts(store, name)]
    table = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.int64()),
                                                            "uri": pa.array([], pa.string()),
                                                            "p_nsfw": pa.array([], pa.float32())})
    writer(table, out)
    return FilterSummary(table.num_rows, store.rows - table.num_rows, threshold, keep, str(out), scored)

