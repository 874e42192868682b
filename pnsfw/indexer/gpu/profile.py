"""`--gpu-profile FILE`: a window of the run's units under torch.profiler, summarised per CUDA stream.

The summary says what each stream's GPU time went to in the pipeline itself (the tower beside the decode's
copies and kernels), which no probe of one stage alone shows. The Chrome trace is kept beside it.
"""

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)
FIRST_UNIT = 20  # past start-up: graphs captured, caches warm
UNITS = 8
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cuda_runtime", "cuda_driver")
LONG_CALL_US = 5000.0  # a CUDA call this long on the host is listed with what ran beside it


def _union_us(spans: Iterable[tuple[float, float]]) -> float:
    """Microseconds covered by the union of (start, end) spans."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _top(durations: dict[str, float], count: int = 8) -> list[list[Any]]:
    return [[name[:120], round(us / 1000, 3)] for name, us in sorted(durations.items(), key=lambda kv: -kv[1])[:count]]


def _thread(event: dict[str, Any], names: dict[int, str]) -> str:
    tid = event.get("tid")
    return names.get(tid, str(tid)) if isinstance(tid, int) else str(tid)


def host_calls(calls: list[dict[str, Any]], names: dict[int, str], count: int = 12) -> list[dict[str, Any]]:
    """The CUDA API calls' (host events with a duration) time per (thread, call), most first: count, total and
    longest ms."""
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for event in calls:
        entry = totals[(_thread(event, names), event.get("name", "?"))]
        entry[0] += 1
        entry[1] += float(event["dur"])
        entry[2] = max(entry[2], float(event["dur"]))
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:count]
    return [{"thread": thread, "call": call, "count": int(n), "total_ms": round(total / 1000, 3),
             "max_ms": round(longest / 1000, 3)} for (thread, call), (n, total, longest) in ranked]


def long_calls(calls: list[dict[str, Any]], names: dict[int, str], count: int = 20) -> list[dict[str, Any]]:
    """Of the CUDA API calls, those of LONG_CALL_US or more, each with the other threads' calls of 1 ms or more
    that overlapped it (a lock held across threads shows as calls that start and end together)."""
    out = []
    for event in sorted((e for e in calls if float(e["dur"]) >= LONG_CALL_US), key=lambda e: -float(e["dur"])):
        start, end = float(event["ts"]), float(event["ts"]) + float(event["dur"])
        beside = [{"thread": _thread(e, names), "call": e.get("name", "?"), "ms": round(float(e["dur"]) / 1000, 3),
                   "start_ms": round((float(e["ts"]) - start) / 1000, 3)}
                  for e in calls if e.get("tid") != event.get("tid") and float(e["dur"]) >= 1000
                  and float(e["ts"]) < end and float(e["ts"]) + float(e["dur"]) > start]
        out.append({"thread": _thread(event, names), "call": event.get("name", "?"),
                    "ms": round(float(event["dur"]) / 1000, 3), "beside": beside})
        if len(out) == count:
            break
    return out


def summarize(events: list[dict[str, Any]], units: int, images: int, wall_s: float,
              names: dict[int, str] | None = None) -> dict[str, Any]:
    """Per-stream GPU busy ms (and per unit), top kernels, and the union over streams, of a Chrome trace's
    device events; the host's CUDA calls per thread (`names`: thread ids -> names), and the long ones."""
    names = names or {}
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    streams: dict[Any, dict[str, Any]] = defaultdict(lambda: {"spans": [], "names": defaultdict(float),
                                                              "kinds": defaultdict(float), "count": 0})
    for event in device:
        stream = streams[event.get("args", {}).get("stream", event.get("tid"))]
        start, dur = float(event["ts"]), float(event["dur"])
        stream["spans"].append((start, start + dur))
        stream["names"][event.get("name", "?")] += dur
        stream["kinds"][event["cat"]] += dur
        stream["count"] += 1
    spans = [span for s in streams.values() for span in s["spans"]]
    window_us = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    busy_us = {key: _union_us(s["spans"]) for key, s in streams.items()}
    per_stream = {str(key): {"busy_ms": round(busy_us[key] / 1000, 3),
                             "busy_ms_per_unit": round(busy_us[key] / 1000 / max(units, 1), 3),
                             "events": s["count"], "by_kind_ms": {k: round(v / 1000, 3) for k, v in s["kinds"].items()},
                             "top_ms": _top(s["names"])}
                  for key, s in sorted(streams.items(), key=lambda kv: -busy_us[kv[0]])}
    busy = _union_us(spans)
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES and "dur" in e]
    return {"units": units, "images": images, "wall_s": round(wall_s, 4),
            "images_per_s": round(images / wall_s, 1) if wall_s else None,
            "gpu_window_ms": round(window_us / 1000, 3), "gpu_busy_ms": round(busy / 1000, 3),
            "gpu_busy_fraction": round(busy / window_us, 4) if window_us else None,
            "streams": per_stream, "host_calls": host_calls(host, names), "long_calls": long_calls(host, names)}


def thread_names() -> dict[int, str]:
    """This process's threads by the ids a trace may give them (the OS id; the pthread id's low 32 bits)."""
    import threading

    names: dict[int, str] = {}
    for thread in threading.enumerate():
        if thread.ident is not None:
            names[thread.ident & 0xFFFFFFFF] = thread.name
        if thread.native_id is not None:
            names[thread.native_id] = thread.name
    return names


class ProfileWindow:
    """Profiles units [first, first + units) of a run: `step(images)` once per unit, in order."""

    def __init__(self, path: str | None, device: str = "cuda", first: int = FIRST_UNIT, units: int = UNITS):
        index = device.partition(":")[2]
        self.path = f"{path}.cuda{index}" if path and index not in ("", "0") else path  # one file per GPU
        self.first, self.units = first, units
        self.seen = self.done = self.images = 0
        self.profiler: Any = None
        self.started = 0.0

    def step(self, images: int) -> None:
        """A unit's features are out (the window opens after the first-th and closes `units` later)."""
        if not self.path:
            return
        if self.profiler is None:
            if self.seen == self.first:
                self._start()
        else:
            self.images, self.done = self.images + images, self.done + 1
            if self.done == self.units:
                self._stop()
        self.seen += 1

    def _start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def _stop(self) -> None:
        import torch

        assert self.path is not None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        trace = f"{self.path}.trace.json"
        self.profiler.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f).get("traceEvents", [])
        with open(self.path, "w") as f:
            json.dump(summarize(events, self.units, self.images, wall, thread_names()), f, indent=1)
        log.info("GPU profile of %d units written to %s (trace %s)", self.units, self.path, trace)
        self.profiler, self.path = None, None

    def close(self) -> None:
        """A run that ended inside the window: the profiler stopped, nothing written."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None
