"""Labels people give (review page, `pnsfw label`, a file), kept by the store in labels/: validate, save, read.

The store's labels parts are an append-only log: the latest row of an id wins, and a row with a null label
takes a label back (the page's undo), so nothing committed is ever rewritten.
"""

import re
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import BadInput, NotFound
from ..store import Store

SOURCES = ("review", "cli", "file")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def store_label_table(store: Store) -> pa.Table:
    """Every committed labels row (id, label, source, at), oldest first."""
    from ..store.artifacts import read_labels

    return read_labels(store)


def current_rows(store: Store) -> dict[int, dict[str, Any]]:
    """id -> its latest labels row {label, source, at}; ids whose latest row takes the label back are left out."""
    table = store_label_table(store)
    latest: dict[int, dict[str, Any]] = {}
    for id_, label, source, at in zip(*(table.column(c).to_pylist() for c in ("id", "label", "source", "at"))):
        latest[int(id_)] = {"label": label, "source": source, "at": at}
    return {i: row for i, row in latest.items() if row["label"] is not None}


def current_labels(store: Store) -> dict[int, str]:
    """id -> label, as people gave them (latest wins)."""
    return {i: row["label"] for i, row in current_rows(store).items()}


def check_labels(items: list[tuple[int, "str | None"]], allowed: "Iterable[str] | None") -> None:
    """Each label must be one of `allowed` (when given) or at least a plain word; raises BadInput."""
    allowed = list(allowed) if allowed is not None else None
    for item_id, label in items:
        if label is None:
            continue
        if allowed is not None and label not in allowed:
            raise BadInput(f"label {label!r} of id {item_id} is not one of the classes {', '.join(allowed)}")
        if not LABEL_RE.match(label):
            raise BadInput(f"label {label!r} of id {item_id}: use letters, digits, '_', '-', '.' (1-64)")


def check_ids(store: Store, ids: list[int]) -> None:
    """NotFound (404) naming the first id that is not in the store (from the manifest's id ranges: no shard read)."""
    ranges = sorted((s.min_id, s.max_id) for s in store.manifest.shards)
    starts = np.array([a for a, _ in ranges], np.int64)
    ends = np.array([b for _, b in ranges], np.int64)
    wanted = np.asarray(ids, np.int64)
    at = np.searchsorted(starts, wanted, side="right") - 1
    known = (at >= 0) & (wanted <= ends[at.clip(0)]) if len(ranges) else np.zeros(len(wanted), bool)
    missing = wanted[~known]
    if len(missing):
        raise NotFound(f"id {int(missing[0])} is not in store {store.root}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def save_labels(store: Store, items: list[tuple[int, "str | None"]], source: str,
                allowed: "Iterable[str] | None" = None) -> int:
    """Validate and commit labels (None takes one back) as one labels part; the number of rows committed."""
    from ..store.artifacts import append_labels

    if source not in SOURCES:
        raise BadInput(f"label source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not items:
        raise BadInput("no labels given")
    check_labels(items, allowed)
    check_ids(store, [i for i, _ in items])
    now = time.time()
    table = pa.table({"id": pa.array([i for i, _ in items], pa.int64()),
                      "label": pa.array([label for _, label in items], pa.string()),
                      "source": pa.array([source] * len(items), pa.string()),
                      "at": pa.array([now] * len(items), pa.float64())})
    append_labels(store, table)
    return table.num_rows


def model_classes(store: Store, model: "str | None") -> "list[str] | None":
    """The classes of model NAME (or of the store's default model); None when there is none."""
    from .model import DEFAULT_NAME, list_models, load_classifier

    names = list_models(store)
    name = model or (DEFAULT_NAME if DEFAULT_NAME in names else names[0] if len(names) == 1 else None)
    if name is None:
        return None
    return list(load_classifier(store, name).classes)


def run_label(store_root: str, ids: "list[int]", label: "str | None", file: "str | None",
              classes: "list[str] | None" = None, model: "str | None" = None) -> dict[str, Any]:
    """`pnsfw label`: --id ID... --label L, or --file FILE (CSV/Parquet of id or uri, label) into labels/."""
    from pathlib import Path

    from .labels import _from_file

    if bool(ids) == bool(file) or (ids and not label) or (file and label):
        raise BadInput("give --id ID... --label LABEL, or --file FILE")
    store = Store.open(store_root)
    allowed = classes or model_classes(store, model)
    if file:
        found = _from_file(store, Path(file).expanduser())
        items: list[tuple[int, str | None]] = sorted(found.labels.items())
        unknown = found.unknown
        if not items:
            raise BadInput(f"none of the {len(unknown)} entries of {file} names an item of the store")
    else:
        items, unknown = [(int(i), label) for i in ids], []
    saved = save_labels(store, items, "file" if file else "cli", allowed)
    return {"saved": saved, "unknown": len(unknown), "unknown_examples": unknown[:5],
            "labels": len(current_labels(store)), "classes": allowed}
