"""The writer thread (pnsfw.indexer.writer.WriterThread): the same commits as the ShardWriter on the caller's
thread, in order; failures raised on the caller's thread; a stopped run keeps exactly what was committed."""

import threading
import time

import numpy as np
import pytest

from pnsfw.indexer.reader import Result
from pnsfw.indexer.sources import Item
from pnsfw.indexer.writer import ShardWriter, WriterThread


class Identity:
    def apply(self, features: np.ndarray) -> np.ndarray:
        return features


class FakeStore:
    """What ShardWriter needs of a StoreWriter; records each commit as (ids, uris, error uris)."""

    def __init__(self, pause: float = 0.0, fail_at: int = -1):
        self.commits: list[tuple[list[int], list[str], list[str]]] = []
        self.next_id, self.pause, self.fail_at = 0, pause, fail_at
        self.in_commit = threading.Event()

    def next_ids(self, count: int) -> np.ndarray:
        return np.arange(self.next_id, self.next_id + count, dtype=np.int64)

    def commit(self, rows, errors) -> None:
        self.in_commit.set()
        time.sleep(self.pause)
        if len(self.commits) == self.fail_at:
            raise OSError("disk full")
        ids = rows.column("id").to_pylist() if rows is not None else []
        self.next_id += len(ids)
        self.commits.append((ids, rows.column("uri").to_pylist() if rows is not None else [],
                             errors.column("uri").to_pylist() if errors is not None else []))


def _shards(store: FakeStore, size: int = 5) -> ShardWriter:
    return ShardWriter(store, size, 3600.0, Identity(), lambda sample: Identity(), 0)  # type: ignore[arg-type]


def _calls(count: int = 40) -> list[tuple]:
    """Batches of 3 rows with an error row after every third batch."""
    calls: list[tuple] = []
    for start in range(0, count, 3):
        rows = [Result(Item(f"u{i}", "src"), None, f"h{i}", 4, 4) for i in range(start, start + 3)]
        calls.append(("add", rows, np.full((3, 2), start, np.float32)))
        if start % 9 == 0:
            calls.append(("add_error", Result(Item(f"bad{start}", "src"), None, stage="decode", reason="corrupt")))
    return calls


def _drive(writer, calls: list[tuple]) -> None:
    for name, *args in calls:
        getattr(writer, name)(*args)
    writer.commit()


def test_the_same_commits_in_the_same_order_as_on_the_callers_thread():
    direct, threaded = FakeStore(), FakeStore()
    _drive(_shards(direct), _calls())
    writer = WriterThread(_shards(threaded), depth=2)
    _drive(writer, _calls())
    assert threaded.commits == direct.commits and len(direct.commits) > 5
    assert [i for ids, _, _ in threaded.commits for i in ids] == list(range(42))
    assert not writer.thread.is_alive() and writer.busy_s > 0


def test_a_failed_commit_is_raised_on_the_callers_thread_and_nothing_hangs():
    store = FakeStore(fail_at=2)
    writer = WriterThread(_shards(store), depth=1)
    with pytest.raises(OSError, match="disk full"):
        _drive(writer, _calls(200))
    writer.close(discard=True)
    assert not writer.thread.is_alive() and len(store.commits) == 2


def test_close_with_discard_waits_for_the_commit_in_progress_and_drops_the_rest():
    store = FakeStore(pause=0.3)
    writer = WriterThread(_shards(store), depth=64)
    for name, *args in _calls(60):
        getattr(writer, name)(*args)
    assert store.in_commit.wait(5)
    writer.close(discard=True)
    committed = len(store.commits)
    assert committed >= 1 and not writer.thread.is_alive()
    time.sleep(0.4)
    assert len(store.commits) == committed  # nothing after the stop
    ids = [i for ids, _, _ in store.commits for i in ids]
    assert ids == list(range(len(ids)))  # a prefix of the stream


class Doubling:
    """A projection that doubles the features, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def apply(self, features: np.ndarray) -> np.ndarray:
        self.calls += 1
        return features * 2


def test_batches_are_made_ready_as_they_arrive_and_shards_join_them_in_stream_order():
    """Raw until the projection is fitted, then each batch projected when it is added (a commit only joins);
    shards cut where they end; metadata columns in first-seen order, null for rows without them."""
    tables: list = []

    class Recording(FakeStore):
        def commit(self, rows, errors) -> None:
            tables.append(rows)
            super().commit(rows, errors)

    projection = Doubling()
    writer = ShardWriter(Recording(), 5, 3600.0, None, lambda sample: projection, 4)  # type: ignore[arg-type]
    features = np.arange(18, dtype=np.float32).reshape(9, 2)
    rows = [Result(Item(f"u{i}", "src", meta=(("caption", f"c{i}"),) if i % 4 == 0 else ()), None, f"h{i}", 4, 4)
            for i in range(9)]
    writer.add(rows[:3], features[:3])  # 3 rows: short of the fit's 4, nothing committed
    writer.add(rows[3:6], features[3:6])  # 6: fitted on all six, a shard of 5, then the row left over
    assert [t.num_rows for t in tables] == [5, 1] and projection.calls == 3  # the raw parts, at the fit
    writer.add(rows[6:], features[6:])
    assert projection.calls == 4  # projected when added
    writer.commit()
    assert projection.calls == 4 and [t.num_rows for t in tables] == [5, 1, 3]
    assert [i for t in tables for i in t.column("id").to_pylist()] == list(range(9))
    assert [u for t in tables for u in t.column("uri").to_pylist()] == [f"u{i}" for i in range(9)]
    vectors = np.concatenate([np.frombuffer(t.column("embedding").combine_chunks().buffers()[1], "<f2").reshape(-1, 2)
                              for t in tables])
    assert np.array_equal(vectors, (features * 2).astype(np.float16))
    assert tables[0].column("caption").to_pylist() == ["c0", None, None, None, "c4"]
    assert "caption" not in tables[1].column_names  # no row of that shard has one
    assert tables[2].column("caption").to_pylist() == [None, None, "c8"]


def test_columns_are_built_without_pyarrow_conversions():
    """string_array / number_array / number_values equal pa.array / to_numpy (nulls, slices, chunks)."""
    import pyarrow as pa

    from pnsfw.store.shards import NUMPY_DTYPES, number_array, number_values, numpy_dtype, string_array

    for values in (["a", None, "ü/x.jpg", ""], ["ü/x.jpg", "b", "", "日本/語.jpg"], ["plain", "ascii"], []):
        assert string_array(iter(values)).equals(pa.array(values, pa.string())), values
    assert number_array([3, -1, 7], pa.int32()).equals(pa.array([3, -1, 7], pa.int32()))
    hashes = number_array(np.array([2**63 + 5, 1, 9], np.uint64), pa.uint64())
    assert hashes.type == pa.uint64() and hashes.to_pylist() == [2**63 + 5, 1, 9]
    column = pa.chunked_array([hashes.slice(1), hashes.slice(0, 1)])
    assert number_values(column).tolist() == [1, 9, 2**63 + 5]
    with pytest.raises(ValueError, match="nulls"):
        number_values(pa.array([1, None], pa.int64()))
    for kind, dtype in NUMPY_DTYPES.items():  # the table agrees with pyarrow's own (which may import pandas)
        assert numpy_dtype(kind) == np.dtype(kind.to_pandas_dtype()) == np.dtype(dtype), kind
        assert number_array(np.arange(3), kind).equals(pa.array([0, 1, 2], kind)), kind
    with pytest.raises(TypeError, match="fixed-width"):
        number_array([1], pa.string())


INDEX_AND_LIST_MODULES = """
import sys
from pnsfw.cli import cli
for extra in (["--no-faiss"], ["--retry-errors"]):  # the resume also builds the FAISS index
    cli.main(["index", sys.argv[1], "--store", sys.argv[2], "--model", sys.argv[3], "--device", "cpu",
              "--workers", "-1", *extra], standalone_mode=False)
print("imported:", *sorted(name for name in ("pandas", "pyarrow.dataset") if name in sys.modules))
"""


def test_an_index_run_and_its_resume_import_neither_pandas_nor_pyarrow_dataset(tmp_path, tiny_checkpoint):
    """pyarrow imports pandas at its first pa.array, to_numpy or pq.read_table: 1.2-2.3 s of Python holding the
    GIL beside the first batches (docs/benchmarks.md, GPU round 15). A fresh run with an error row and a
    metadata column, then a resume that reads the errors and the shards' uri hashes and builds the FAISS index,
    stay clear of both."""
    import subprocess
    import sys

    from PIL import Image

    from pnsfw.store import Store

    lines = ["uri,caption"]
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (40 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
        lines.append(f"{tmp_path / f'{i}.jpg'},caption {i}")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "list.csv").write_text("\n".join([*lines, f"{tmp_path / 'bad.jpg'},broken"]) + "\n")
    run = subprocess.run([sys.executable, "-c", INDEX_AND_LIST_MODULES, str(tmp_path / "list.csv"),
                          str(tmp_path / "store"), str(tiny_checkpoint)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "imported:", run.stdout
    store = Store.open(tmp_path / "store")
    assert store.rows == 6 and store.table(["caption"]).column("caption").to_pylist()[0] == "caption 0"
    assert store.errors().column("uri").to_pylist() == [str(tmp_path / "bad.jpg")] * 2
