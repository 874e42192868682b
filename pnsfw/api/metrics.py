"""Prometheus text-format metrics, written by hand (counters and histograms need no extra dependency)."""

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
INF = 'le="+Inf"'
Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    """Cumulative-bucket histogram keyed by label values."""

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self._counts: dict[Labels, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self._sums: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[key][slot] += 1
            self._sums[key] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = [(k, list(v), self._sums[k]) for k, v in sorted(self._counts.items())]
        for key, counts, total in items:
            running = 0
            for bound, count in zip(self.buckets, counts):
                running += count
                le = f'le="{bound:g}"'
                lines.append(f"{self.name}_bucket{_labels(key, le)} {running}")
            running += counts[-1]
            lines.append(f"{self.name}_bucket{_labels(key, INF)} {running}")
            lines.append(f"{self.name}_sum{_labels(key)} {total:.6g}")
            lines.append(f"{self.name}_count{_labels(key)} {running}")
        return lines


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self._values: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self._values.items())]
        return lines


class Metrics:
    """The server's metrics: requests, latency, batch sizes and batch time."""

    def __init__(self) -> None:
        self.requests = Counter("pnsfw_requests_total", "HTTP requests by route, method and status.")
        self.latency = Histogram("pnsfw_request_seconds", "HTTP request latency by route.", LATENCY_BUCKETS)
        self.batch_size = Histogram("pnsfw_batch_size", "Items per micro-batch by stage.", BATCH_BUCKETS)
        self.batch_seconds = Histogram("pnsfw_batch_seconds", "Model time per micro-batch by stage.",
                                       LATENCY_BUCKETS)
        self.gauges: dict[str, tuple[str, float]] = {}

    def set_gauge(self, name: str, help_text: str, value: float) -> None:
        self.gauges[name] = (help_text, value)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.latency, self.batch_size, self.batch_seconds):
            lines += metric.render()
        for name, (help_text, value) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
