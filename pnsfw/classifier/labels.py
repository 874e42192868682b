"""Training labels: from the folder layout of the indexed sources, or from a CSV/Parquet file."""

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import BadInput
from ..store import Store
from ..store.shards import TAR_SEPARATOR


@dataclass
class LabelSet:
    """Labels by store id, plus what could not be matched (reported, then skipped)."""

    labels: dict[int, str]
    unknown: list[str] = field(default_factory=list)
    unlabelled: int = 0
    ignored: dict[str, int] = field(default_factory=dict)  # label -> rows dropped as no class (see ABSTAIN)


# reviewers' "do not know" answers (a declared --label-classes may offer them): never a class to train on
ABSTAIN = ("unsure", "skip")


def parse_ignored(text: "str | None") -> tuple[str, ...]:
    """`--ignore-labels a,b` (None: ABSTAIN; an empty string: keep every label)."""
    if text is None:
        return ABSTAIN
    return tuple(t.strip() for t in text.split(",") if t.strip())


def folder_label(uri: str, source: str) -> "str | None":
    """The first folder of the uri below its source (for a tar member: of the member path)."""
    if TAR_SEPARATOR in uri:
        relative = uri.split(TAR_SEPARATOR, 1)[1]
    else:
        try:
            relative = os.path.relpath(uri, source)
        except ValueError:
            return None
        if relative.startswith(".."):
            return None
    parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".")]
    return parts[0] if len(parts) >= 2 else None


def _from_folders(store: Store) -> LabelSet:
    table = store.table(["id", "uri", "source"])
    labels, unlabelled = {}, 0
    for id_, uri, source in zip(*(table.column(c).to_pylist() for c in ("id", "uri", "source"))):
        label = folder_label(uri, source)
        if label is None:
            unlabelled += 1
        else:
            labels[int(id_)] = label
    return LabelSet(labels, unlabelled=unlabelled)


def _read_csv(path: Path) -> pa.Table:
    import pyarrow.csv as pcsv

    return pcsv.read_csv(path)


def _read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


LABEL_FILE_READERS: dict[str, Callable[[Path], pa.Table]] = {
    ".csv": _read_csv, ".parquet": _read_parquet, ".pq": _read_parquet}


def read_label_file(path: Path) -> pa.Table:
    reader = LABEL_FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise BadInput(f"labels file {path}: use a .csv or .parquet file (or `folders`)")
    try:
        table = reader(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise BadInput(f"cannot read labels file {path}: {str(exc).splitlines()[0]}") from None
    if "label" not in table.column_names or not ({"uri", "id"} & set(table.column_names)):
        raise BadInput(f"labels file {path} needs a `label` column and a `uri` or `id` column; "
                       f"it has {', '.join(table.column_names)}")
    return table


def _uri_keys(uri: str, base: Path) -> list[str]:
    """The forms a uri of a labels file may match in the store (as written, or resolved against the file)."""
    if uri.startswith(("http://", "https://")) or os.path.isabs(uri):
        return [uri]
    return [uri, str((base / uri).resolve())]


def _from_file(store: Store, path: Path) -> LabelSet:
    table = read_label_file(path)
    keys = table.column("id" if "id" in table.column_names else "uri").to_pylist()
    values = [None if v is None else str(v) for v in table.column("label").to_pylist()]
    stored = store.table(["id", "uri"])
    candidates: list[list[Any]]
    if "id" in table.column_names:
        lookup = {int(i): int(i) for i in stored.column("id").to_pylist()}
        candidates = [[int(k)] if k is not None else [] for k in keys]
    else:
        lookup = dict(zip(stored.column("uri").to_pylist(), stored.column("id").to_pylist()))
        candidates = [_uri_keys(str(k), path.parent) if k is not None else [] for k in keys]
    labels, unknown = {}, []
    for key, forms, label in zip(keys, candidates, values):
        found = next((lookup[f] for f in forms if f in lookup), None)
        if found is None:
            unknown.append(str(key))
        elif label:
            labels[int(found)] = label
    return LabelSet(labels, unknown=unknown)


def _from_store(store: Store) -> LabelSet:
    from .reviewed import current_labels

    return LabelSet(current_labels(store))


def _one_source(store: Store, spec: str) -> tuple[LabelSet, str]:
    """The labels of one spec and a hint of why it may have none."""
    if spec == "store":
        return _from_store(store), "no labels were given yet (`pnsfw label` or the review page)"
    if spec == "folders":
        return _from_folders(store), "no image lies in a sub-folder of its source (expected SOURCE/<label>/...)"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInput(f"labels {spec!r}: not `folders`, not `store` and not a file")
    result = _from_file(store, path)
    return result, f"none of the {len(result.unknown)} entries of {path} is in the store"


def read_labels(store: Store, spec: str, ignore: Iterable[str] = ABSTAIN) -> LabelSet:
    """Labels and the unmatched entries, the labels in `ignore` dropped (counted in .ignored); raises BadInput
    when no label is left.

    spec: `folders`, `store` (labels given with `pnsfw label` or the review page) or a file; several joined by
    `+` are merged, a later one winning for an id (`folders+store`: reviewed labels correct folder labels)."""
    merged, hints = LabelSet({}), []
    for part in [p.strip() for p in spec.split("+")]:
        one, hint = _one_source(store, part)
        merged.labels.update(one.labels)
        merged.unknown += one.unknown
        merged.unlabelled = max(merged.unlabelled, one.unlabelled)
        hints.append(hint)
    dropped = {i for i, label in merged.labels.items() if label in set(ignore)}
    merged.ignored = dict(Counter(merged.labels.pop(i) for i in sorted(dropped)))
    if merged.ignored and not merged.labels:
        raise BadInput(f"every label in store {store.root} is ignored ({ignored_text(merged.ignored)}); "
                       "--ignore-labels '' keeps them")
    if not merged.labels:
        raise BadInput(f"no labels found in store {store.root}: {'; '.join(hints)}")
    return merged


def ignored_text(ignored: dict[str, int]) -> str:
    return ", ".join(f"{label} {count:,}" for label, count in sorted(ignored.items()))


def load_labels(store: Store, spec: str) -> dict[int, str]:
    """id -> label. spec: "folders" (first folder of the uri below its source), "store", a CSV/Parquet file,
    or several joined by "+"."""
    return read_labels(store, spec).labels
