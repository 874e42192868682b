"""Files a user hands in (.npy vectors) and gets back (result tables, by extension: .parquet .csv .jsonl .txt).

Shared by every stage (filter, dedup, predict, search), so each kind of file is read or written one way.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInput

Writer = Callable[[Any, Path], None]


def load_vectors(path: "str | Path", dim: int, raw_width: "int | None" = None) -> np.ndarray:
    """A .npy file of one vector (dim,) or many (n, dim) -> (n, dim) float32, all finite; BadInput otherwise.
    With `raw_width`, rows of that width (raw CLIP features, projected by the caller) are accepted too."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read vectors {path}: {str(exc).splitlines()[0]}") from None
    array = array[None, :] if array.ndim == 1 else array
    widths = {dim} if raw_width is None else {dim, raw_width}
    if array.ndim != 2 or array.shape[1] not in widths or not len(array) or array.dtype.kind not in "fiu":
        raw = f", or (n, {raw_width}) raw CLIP features" if raw_width not in (None, dim) else ""
        raise BadInput(f"{path}: expected numbers of shape ({dim},) or (n, {dim}) (the store's space){raw}, "
                       f"got {array.dtype} {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise BadInput(f"{path}: holds NaN or infinite values")
    return array


def _parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd")


def _csv(table: Any, path: Path) -> None:
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, path)


def _jsonl(table: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row, default=str) + "\n")


def _txt(table: Any, path: Path) -> None:
    if "uri" not in table.column_names:
        raise BadInput(f"{path}: a .txt output holds uris, and these results have none")
    path.write_text("".join(f"{uri}\n" for uri in table.column("uri").to_pylist()), encoding="utf-8")


WRITERS: dict[str, Writer] = {".parquet": _parquet, ".pq": _parquet, ".csv": _csv, ".jsonl": _jsonl,
                              ".txt": _txt}


def check_output(path: "str | Path", allowed: "tuple[str, ...] | None" = None) -> Writer:
    """The writer for OUT's extension (checked before any work is done), or one line naming the choices."""
    suffix = Path(path).suffix.lower()
    choices = allowed or tuple(WRITERS)
    if suffix not in choices:
        raise BadInput(f"--out {path}: use a file ending in {', '.join(choices)}")
    return WRITERS[suffix]


def write_table(table: Any, path: "str | Path", allowed: "tuple[str, ...] | None" = None) -> Path:
    """Write a pyarrow table to PATH in the format of its extension, atomically (a reader never sees half)."""
    from .store.files import atomic_write

    writer, path = check_output(path, allowed), Path(path)
    atomic_write(path, lambda tmp: writer(table, tmp))
    return path
