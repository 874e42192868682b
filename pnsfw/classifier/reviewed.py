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
    """Every committed labels row (id, label, source, at, by, classes), oldest first: the audit trail."""
    from ..store.artifacts import read_labels

    return read_labels(store)


ROW_FIELDS = ("label", "source", "at", "by", "classes")


class LabelLog:
    """The latest labels row of every id, kept current by reading only the parts committed since the last look
    (a server that saves one label at a time must not re-read the whole log per label)."""

    def __init__(self, store: Store):
        self.store = store
        self._read: list[str] = []
        self._latest: dict[int, dict[str, Any]] = {}
        self._declared: str | None = None
        self._tables: list[pa.Table] = []

    def current(self, refresh: bool = True) -> dict[int, dict[str, Any]]:
        """id -> {label, source, at, by, classes}; ids whose latest row takes the label back are left out."""
        from ..store.artifacts import read_labels

        if refresh:
            self.store.refresh()
        parts = self.store.manifest.labels
        if [p.name for p in parts[: len(self._read)]] != self._read:  # rewritten (repair): read it all again
            self._read, self._latest, self._declared, self._tables = [], {}, None, []
        new = parts[len(self._read):]
        if new:
            table = read_labels(self.store, new)
            columns = [table.column(c).to_pylist() for c in ("id", *ROW_FIELDS)]
            for id_, *values in zip(*columns):
                row = self._latest[int(id_)] = dict(zip(ROW_FIELDS, values))
                self._declared = row["classes"] or self._declared
            self._read += [p.name for p in new]
            self._tables.append(table)
        return {i: row for i, row in self._latest.items() if row["label"] is not None}

    def history(self) -> pa.Table:
        """Every row of the log, oldest first (as read by the last `current`)."""
        from ..store.shards import LABEL_SCHEMA

        return pa.concat_tables(self._tables) if self._tables else LABEL_SCHEMA.empty_table()

    def recorded_classes(self) -> list[str] | None:
        """The label set declared with the newest labels that declared one (None: none did)."""
        self.current(refresh=False)
        return self._declared.split(",") if self._declared else None


def resolve_classes(log: LabelLog, given: "list[str] | None", model: "list[str] | None"
                    ) -> tuple["list[str] | None", bool]:
    """(the labels a person may give, whether it is a declared set): `given` (--label-classes), else the set
    recorded with the store's labels, else the model's classes (not a declaration), else None (any plain word)."""
    if given:
        clean = [c.strip() for c in given if c.strip()]
        check_labels([(0, c) for c in clean], None)
        if len(set(clean)) != len(clean) or not clean:
            raise BadInput(f"label classes must be distinct words, got {','.join(given)!r}")
        return clean, True
    recorded = log.recorded_classes()
    if recorded:
        return recorded, True
    return (list(model), False) if model else (None, False)


def current_rows(store: Store) -> dict[int, dict[str, Any]]:
    """id -> its latest labels row {label, source, at, by, classes}; ids whose latest row takes the label back
    are left out."""
    return LabelLog(store).current(refresh=False)


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
                allowed: "Iterable[str] | None" = None, by: "str | None" = None, declared: bool = False) -> int:
    """Validate and commit labels (None takes one back) as one labels part, with who gave them (`by`) and, when
    `declared`, the allowed set recorded beside them; the number of rows committed."""
    from ..store.artifacts import append_labels

    if source not in SOURCES:
        raise BadInput(f"label source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not items:
        raise BadInput("no labels given")
    allowed = list(allowed) if allowed is not None else None
    check_labels(items, allowed)
    check_ids(store, [i for i, _ in items])
    now, n = time.time(), len(items)
    classes = ",".join(allowed) if declared and allowed else None
    table = pa.table({"id": pa.array([i for i, _ in items], pa.int64()),
                      "label": pa.array([label for _, label in items], pa.string()),
                      "source": pa.array([source] * n, pa.string()), "at": pa.array([now] * n, pa.float64()),
                      "by": pa.array([by] * n, pa.string()), "classes": pa.array([classes] * n, pa.string())})
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


def user_name() -> str | None:
    """The login name of this process (None where the system has none)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def run_label(store_root: str, ids: "list[int]", label: "str | None", file: "str | None",
              classes: "list[str] | None" = None, model: "str | None" = None, by: "str | None" = None
              ) -> dict[str, Any]:
    """`pnsfw label`: --id ID... --label L, or --file FILE (CSV/Parquet of id or uri, label) into labels/."""
    from pathlib import Path

    from .labels import _from_file

    if bool(ids) == bool(file) or (ids and not label) or (file and label):
        raise BadInput("give --id ID... --label LABEL, or --file FILE")
    store = Store.open(store_root)
    log = LabelLog(store)
    allowed, declared = resolve_classes(log, classes, None if classes else model_classes(store, model))
    if file:
        found = _from_file(store, Path(file).expanduser())
        items: list[tuple[int, str | None]] = sorted(found.labels.items())
        unknown = found.unknown
        if not items:
            raise BadInput(f"none of the {len(unknown)} entries of {file} names an item of the store")
    else:
        items, unknown = [(int(i), label) for i in ids], []
    saved = save_labels(store, items, "file" if file else "cli", allowed, by or user_name(), declared)
    return {"saved": saved, "unknown": len(unknown), "unknown_examples": unknown[:5],
            "labels": len(log.current()), "classes": allowed}
