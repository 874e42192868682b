"""`pnsfw filter`: the rows kept by a threshold on the bulk scores, to Parquet, CSV, JSON lines or a uri list."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import BadInput, StoreError
from ..store import Store
from ..store import shards as shard_io
from ..userio import check_output, write_table
from .model import DEFAULT_NAME, read_meta
from .scoring import score_store, scored_parts, scores_of

KEEP: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "safe": lambda p, t: p < t, "unsafe": lambda p, t: p >= t}
BASE = ["id", "uri", "p_nsfw"]
HIDDEN = {"embedding"}  # never copied into an output table


@dataclass
class FilterSummary:
    kept: int
    dropped: int
    threshold: float
    keep: str
    out: str
    newly_scored: int
    columns: list[str]


def _split_columns(store: Store, classes: list[str], extra: list[str]) -> tuple[list[str], list[str]]:
    """--columns -> (score columns p_<class>, shard metadata columns); one line naming the choices otherwise."""
    stored = [c for c in store.shard_columns() if c not in HIDDEN]
    scores = [f"p_{c}" for c in classes]
    unknown = [c for c in extra if c not in scores and c not in stored and c not in BASE]
    if unknown:
        raise BadInput(f"--columns {', '.join(unknown)}: not a column; choose from {', '.join(scores + stored)}")
    return [c for c in extra if c in scores], [c for c in extra if c in stored and c not in BASE]


def _kept_rows(store: Store, folder: Any, part: str, keep: str, threshold: float, score_cols: list[str],
               meta_cols: list[str]) -> pa.Table:
    rows = shard_io.read_table(store.shard_source(part), ["id", "uri", *meta_cols])
    scores = shard_io.read_table(folder.part_source(part), ["id", "p_nsfw", *score_cols])
    if not rows.column("id").equals(scores.column("id")):
        raise StoreError(f"scores {folder.part(part)} do not match shard {part}; rerun `pnsfw score`")
    mask = pa.array(KEEP[keep](scores.column("p_nsfw").to_numpy(), threshold))
    columns = {"id": rows.column("id"), "uri": rows.column("uri"), "p_nsfw": scores.column("p_nsfw")}
    columns.update({c: scores.column(c) for c in score_cols})
    columns.update({c: rows.column(c) for c in meta_cols})
    return pa.table(columns).filter(mask)


def filter_store(store_root: "str | Path", out: "str | Path", name: str = DEFAULT_NAME,
                 threshold: float | None = None, keep: str = "safe",
                 columns: "list[str] | None" = None, progress: bool = False) -> FilterSummary:
    """Score any unscored shards (progress: score's bar), then write the rows with p_nsfw < T (safe) or >= T
    (unsafe) to OUT: id, uri, p_nsfw, then the --columns asked for (p_<class> and stored metadata)."""
    check_output(out)
    if keep not in KEEP:
        raise BadInput(f"--keep {keep!r}: use safe or unsafe")
    store = Store.open(store_root)
    meta = read_meta(store, name)
    score_cols, meta_cols = _split_columns(store, list(meta["classes"]), list(columns or []))
    scored = score_store(store_root, name, progress=progress).scored
    store = Store.open(store_root)
    threshold = float(meta["threshold"] if threshold is None else threshold)
    folder = scores_of(store, name)
    parts = [_kept_rows(store, folder, p, keep, threshold, score_cols, meta_cols) for p in scored_parts(store, name)]
    if not parts:
        raise StoreError(f"store {store.root} has no rows to filter")
    table = pa.concat_tables(parts)
    write_table(table, out)
    return FilterSummary(table.num_rows, store.rows - table.num_rows, threshold, keep, str(out), scored,
                         table.column_names)
