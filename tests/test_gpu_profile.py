"""--gpu-profile: the per-stream summary of a profiled window of units."""

import json
from pathlib import Path

import pytest
import torch

from pnsfw.indexer.gpu.profile import ProfileWindow, summarize


def _kernel(stream: int, ts: float, dur: float, name: str = "k", cat: str = "kernel") -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summary_counts_each_streams_busy_time_once_and_the_union_over_streams() -> None:
    events = [_kernel(7, 0, 10, "gemm"), _kernel(7, 5, 10, "gemm"),  # overlapping on one stream: 15 us busy
              _kernel(9, 12, 8, "copy", "gpu_memcpy"), _kernel(9, 40, 10, "rgba2rgb"),
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}]  # host events are not GPU time
    summary = summarize(events, units=3, images=2048, wall_s=0.5)
    assert summary["gpu_window_ms"] == 0.05 and summary["gpu_busy_ms"] == 0.03  # 0-20 and 40-50
    assert summary["gpu_busy_fraction"] == 0.6 and summary["images_per_s"] == 4096.0
    assert list(summary["streams"]) == ["9", "7"]  # busiest first: 18 us against 15
    seven = summary["streams"]["7"]
    assert seven["busy_ms"] == 0.015 and seven["busy_ms_per_unit"] == 0.005 and seven["events"] == 2
    assert seven["top_ms"] == [["gemm", 0.02]] and summary["streams"]["9"]["by_kind_ms"] == {
        "gpu_memcpy": 0.008, "kernel": 0.01}


def test_window_opens_after_the_first_units_and_writes_once(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    window = ProfileWindow(str(path), "cpu", first=2, units=3)
    x = torch.ones(64, 64)
    for unit in range(8):
        x = torch.tanh(x @ x / 64)
        window.step(10 + unit)
        assert path.exists() == (unit >= 5), unit
    summary = json.loads(path.read_text())
    assert summary["units"] == 3 and summary["images"] == 13 + 14 + 15 and summary["wall_s"] > 0
    assert (tmp_path / "profile.json.trace.json").exists()
    window.close()


def test_second_gpus_window_writes_a_file_of_its_own(tmp_path: Path) -> None:
    assert ProfileWindow(str(tmp_path / "p.json"), "cuda:1").path == str(tmp_path / "p.json.cuda1")
    assert ProfileWindow(str(tmp_path / "p.json"), "cuda:0").path == str(tmp_path / "p.json")
    assert ProfileWindow(None, "cuda:1").path is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_window_on_cuda_sees_each_streams_kernels(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    window = ProfileWindow(str(path), "cuda", first=0, units=2)
    side = torch.cuda.Stream()
    x = torch.ones(512, 512, device="cuda")
    for _ in range(3):
        with torch.cuda.stream(side):
            y = x @ x
        x = torch.relu(x) + 1
        window.step(1)
    del y
    streams = json.loads(path.read_text())["streams"]
    assert len(streams) >= 2 and all(s["busy_ms"] > 0 for s in streams.values())


def test_late_window_starts_at_the_batch_past_half_the_images() -> None:
    """Steady: from the first batch to the end; late: from the first batch at or past half the images (a
    pipeline with several batches in flight hands out a burst after the first)."""
    from pnsfw.indexer.pipeline import IndexSummary, _steady_rates

    summary = IndexSummary(indexed=1000)
    _steady_rates(summary, [(1.0, 100), (3.0, 400), (3.1, 700), (3.2, 1000)], end=4.0)
    assert (summary.steady_seconds, summary.steady_images) == (3.0, 900)
    assert (summary.late_seconds, summary.late_images) == (pytest.approx(0.9), 300)
    assert summary.as_dict()["late_images_per_s"] == pytest.approx(300 / 0.9)
    empty = IndexSummary()
    _steady_rates(empty, [], end=1.0)
    assert empty.late_images_per_s == 0.0 and empty.steady_images_per_s == 0.0


def test_host_buffers_are_reused_once_given_back() -> None:
    from pnsfw.indexer.gpu.encode import HostBuffers

    buffers = HostBuffers(pinned=False)
    first = buffers.take((4, 8))
    second = buffers.take((4, 8))
    assert first.numel() == second.numel() == 32 and first.data_ptr() != second.data_ptr()
    buffers.give(first)
    assert buffers.take((2, 8)).data_ptr() == first.data_ptr()  # a smaller unit fits in it
    buffers.give(second)
    assert buffers.take((8, 8)).numel() == 64 and len(buffers.free) == 1  # too small: a new one, kept aside


def test_host_calls_per_thread_and_the_long_ones_with_what_ran_beside() -> None:
    def call(tid: int, name: str, ts: float, dur: float) -> dict:
        return {"cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [call(1, "cudaLaunchKernel", 0, 20_000), call(1, "cudaLaunchKernel", 30_000, 10),
              call(2, "cudaMemcpyAsync", 500, 19_000), call(2, "cudaMemcpyAsync", 40_000, 2_000),
              call(3, "cudaEventRecord", 25_000, 3)]
    summary = summarize(events, units=1, images=1, wall_s=1.0, names={1: "MainThread", 2: "pnsfw-nvjpeg_0"})
    assert [c["thread"] for c in summary["host_calls"]] == ["pnsfw-nvjpeg_0", "MainThread", "3"]  # most first
    assert summary["host_calls"][1] == {"thread": "MainThread", "call": "cudaLaunchKernel", "count": 2,
                                        "total_ms": 20.01, "max_ms": 20.0}
    longest = summary["long_calls"]
    assert [(c["thread"], c["ms"]) for c in longest] == [("MainThread", 20.0), ("pnsfw-nvjpeg_0", 19.0)]
    assert longest[0]["beside"] == [{"thread": "pnsfw-nvjpeg_0", "call": "cudaMemcpyAsync", "ms": 19.0,
                                     "start_ms": 0.5}]
