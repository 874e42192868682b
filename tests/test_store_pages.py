"""Single values of a fixed-width column by byte range (pages.page_map) on real Parquet files pyarrow writes."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pnsfw.store.fs import LocalFS
from pnsfw.store.lookup import _chunk_start
from pnsfw.store.pages import PartsFile, merge_ranges, page_map

WIDTH = 24


def _write(path: Path, rows: int, nulls: bool = False, **options: object) -> np.ndarray:
    values = np.random.default_rng(rows).integers(0, 256, (rows, WIDTH), dtype=np.uint8)
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(WIDTH), rows, [None, pa.py_buffer(values.tobytes())])
    if nulls:
        column = pa.array([None if i % 7 == 3 else v for i, v in enumerate(column.to_pylist())], pa.binary(WIDTH))
    table = pa.table({"id": np.arange(rows), "v": column})
    pq.write_table(table, path, use_dictionary=False, **{"compression": "none", **options})
    return values


def _map(path: Path, group: int = 0):
    fs = LocalFS(path.parent)
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(group).column(1)
    start = _chunk_start(chunk)
    return page_map(lambda ranges: fs.read_ranges(path.name, list(ranges)), start, start + chunk.total_compressed_size,
                    meta.row_group(group).num_rows, WIDTH, meta.schema.column(1).max_definition_level > 0), fs


@pytest.mark.parametrize("options", [{}, {"data_page_size": 700}, {"data_page_size": 1000, "data_page_version": "2.0"},
                                     {"data_page_size": 900, "write_statistics": True}])
def test_every_value_is_found_by_its_byte_range(tmp_path: Path, options: dict) -> None:
    path = tmp_path / "a.parquet"
    values = _write(path, 3001, **options)
    pages, fs = _map(path)
    assert pages is not None and (len(pages.first_rows) > 1) == bool(options)
    rows = np.array([0, 1, 17, 1500, 2999, 3000])
    got = fs.read_ranges(path.name, pages.ranges(rows))
    assert [bytes(g) for g in got] == [values[r].tobytes() for r in rows]


@pytest.mark.parametrize("dictionary", [False, True])
def test_pages_it_cannot_address_give_none(tmp_path: Path, dictionary: bool) -> None:
    """Nulls (a value's position is not its row's) and dictionary pages: None, and readers read the row group
    (compressed chunks never get here: RowGroups.values reads only UNCOMPRESSED ones by range)."""
    path = tmp_path / "b.parquet"
    _write(path, 500, nulls=not dictionary)
    if dictionary:
        pq.write_table(pq.read_table(path), path, use_dictionary=True, compression="none")
    assert _map(path)[0] is None


def test_parts_file_serves_known_parts_and_fetches_the_rest(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    fetched: list[tuple[int, int]] = []

    def fetch(ranges):
        fetched.extend(ranges)
        return [data[a:b] for a, b in ranges]

    f = PartsFile(len(data), {100: data[100:300], len(data) - 50: data[-50:]}, fetch)
    f.seek(120)
    assert f.read(10) == data[120:130] and not fetched
    f.seek(-20, 2)
    assert f.read() == data[-20:] and not fetched
    f.seek(400)
    assert f.read(5) == data[400:405] and fetched == [(400, 405)]
    assert merge_ranges([(50, 60), (0, 10), (12, 20), (100, 200)], 5) == [(0, 20), (50, 60), (100, 200)]
