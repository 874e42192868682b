"""The scoring pipeline's ordering and crash safety, with parallel writers finishing out of order."""

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pnsfw.classifier import pipeline
from pnsfw.classifier.engines import Engine
from pnsfw.classifier.pipeline import Pipeline

PATHS = [Path(f"part-{i:05d}.parquet") for i in range(40)]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    time.sleep(random.random() / 500)
    number = int(path.name[5:10])
    return np.arange(number * 10, number * 10 + 10), np.full((10, 4), number, np.float16)


class _Sum(Engine):
    def __init__(self) -> None:
        super().__init__("sum", "fp32", 1, run=lambda v: v.astype(np.float32).sum(axis=1, keepdims=True))


class _Recorder:
    def __init__(self, fail_at: "str | None" = None):
        self.fail_at, self.written, self.commits = fail_at, {}, []
        self.lock = threading.Lock()

    def write(self, name: str, ids: np.ndarray, out: np.ndarray) -> None:
        time.sleep(random.random() / 200)  # writers finish out of order
        if name == self.fail_at:
            raise OSError("disk full")
        with self.lock:
            self.written[name] = (ids, out)

    def commit(self, parts: list[tuple[str, int]]) -> None:
        assert all(name in self.written for name, _ in parts)  # never listed before the part is written
        self.commits.append([name for name, _ in parts])


def test_progress_lists_written_parts_in_order_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_PARTS", 4)
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 60.0)
    recorder = _Recorder()
    times = Pipeline(_Sum(), _read, recorder.write, recorder.commit, readers=3, writers=4).run(PATHS)
    assert [n for batch in recorder.commits for n in batch] == [p.name for p in PATHS]
    assert max(len(batch) for batch in recorder.commits) == 4 and times.progress_writes == len(recorder.commits)
    ids, out = recorder.written["part-00007.parquet"]
    assert ids.tolist() == list(range(70, 80)) and out[:, 0].tolist() == [28.0] * 10


def test_a_failed_write_commits_only_the_prefix_before_it() -> None:
    recorder = _Recorder(fail_at="part-00007.parquet")
    with pytest.raises(OSError, match="disk full"):
        Pipeline(_Sum(), _read, recorder.write, recorder.commit, readers=2, writers=4).run(PATHS)
    assert [n for batch in recorder.commits for n in batch] == [p.name for p in PATHS[:7]]
