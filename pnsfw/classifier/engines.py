"""Scoring engines: the folded classifier (model.forward) on fp16 rows, in numpy, torch on CPU, or torch on CUDA.

An engine is used in two steps so a pipeline can overlap them: `prepare` runs on reader threads (any number
at once) and `submit` on one thread in shard order; `submit` returns a function that waits for the outputs,
(n, width) float32 (sigmoid or softmax), which the score table needs and nothing more.
"""

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import BadInput
from .model import ACTIVATIONS, Classifier, forward

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FORWARD_BLOCK = 2048  # rows: a 256-wide float32 block is 2 MB, one core's L2
BATCH_ROWS = 1 << 16

Waiter = Callable[[], np.ndarray]


class Engine:
    """Base: `prepare` is the identity, `submit` runs `run` over batch_rows slices at once."""

    def __init__(self, name: str, precision: str, width: int, batch_rows: int = BATCH_ROWS,
                 run: "Callable[[np.ndarray], np.ndarray] | None" = None):
        self.name, self.precision, self.width, self.batch_rows = name, precision, width, max(1, batch_rows)
        self._run = run

    def prepare(self, vectors: "np.ndarray | list[np.ndarray]") -> Any:
        """vectors: fp16 (n, dim), or a list of row blocks (a shard's row groups) to stage as one."""
        return join(vectors)

    def submit(self, staged: Any) -> Waiter:
        assert self._run is not None
        step = self.batch_rows
        parts = [self._run(staged[i:i + step]) for i in range(0, len(staged), step)]
        out = np.concatenate(parts) if parts else np.zeros((0, self.width), np.float32)
        return lambda: out

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return self.submit(self.prepare(vectors))()


def join(vectors: "np.ndarray | list[np.ndarray]") -> np.ndarray:
    if isinstance(vectors, np.ndarray):
        return vectors
    return vectors[0] if len(vectors) == 1 else np.concatenate(vectors)


def stacked_shape(vectors: "np.ndarray | list[np.ndarray]") -> tuple[int, int]:
    blocks = [vectors] if isinstance(vectors, np.ndarray) else vectors
    return sum(len(b) for b in blocks), blocks[0].shape[1]


def copy_rows(vectors: "np.ndarray | list[np.ndarray]", target: np.ndarray) -> None:
    """Row blocks straight into place in target: no joined copy of a multi-row-group shard first."""
    start = 0
    for block in [vectors] if isinstance(vectors, np.ndarray) else vectors:
        np.copyto(target[start:start + len(block)], block, casting="same_kind")
        start += len(block)


@functools.lru_cache(maxsize=1)
def _cpu_pool() -> tuple[ThreadPoolExecutor, Any]:
    from threadpoolctl import ThreadpoolController

    return ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))), ThreadpoolController()


def _numpy_run(clf: Classifier) -> Callable[[np.ndarray], np.ndarray]:
    """Cache-sized row blocks, one single-threaded BLAS call chain per core: cast, matmul and tanh stay in L2
    (one 64k-row pass per op through RAM was 2-3x slower), and numpy's element-wise ops use every core."""
    pool, controller = _cpu_pool()

    def run(vectors: np.ndarray) -> np.ndarray:
        blocks = [vectors[i:i + FORWARD_BLOCK] for i in range(0, len(vectors), FORWARD_BLOCK)]
        with controller.limit(limits=1, user_api="blas"):
            return np.concatenate(list(pool.map(lambda block: forward(clf.steps, block), blocks)))

    return run


def _torch_steps(clf: Classifier, device: Any, dtype: Any) -> list[tuple[Any, Any, Callable[[Any], Any]]]:
    import torch

    acts: dict[str, Callable[[Any], Any]] = {
        "tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "sigmoid": torch.sigmoid,
        "softmax": lambda h: torch.softmax(h, dim=1), "linear": lambda h: h, "relu": torch.relu}
    assert set(acts) == set(ACTIVATIONS)
    return [(torch.from_numpy(s.weight).to(device, dtype), torch.from_numpy(s.bias).to(device, dtype),
             acts[s.activation]) for s in clf.steps]


def _torch_cpu_run(clf: Classifier, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """Like the numpy engine: cache-sized blocks on one thread per core (bf16 matmuls use AVX512-BF16/AMX)."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES[precision])
    steps = _torch_steps(clf, torch.device("cpu"), dtype)
    pool, _ = _cpu_pool()

    def block(vectors: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(vectors)).to(dtype)
            for weight, bias, act in steps:
                h = act(torch.addmm(bias, h, weight))
            return h.float().numpy()

    def run(vectors: np.ndarray) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            blocks = [vectors[i:i + FORWARD_BLOCK] for i in range(0, len(vectors), FORWARD_BLOCK)]
            return np.concatenate(list(pool.map(block, blocks)))
        finally:
            torch.set_num_threads(threads)

    return run


class CudaEngine(Engine):
    """Rows go fp16 into pinned host memory (on the reader threads), then H2D on a copy stream that overlaps
    the forward of the previous shard on a compute stream; only the (n, width) float32 outputs come back.
    Pageable memory would halve the H2D rate; torch's caching host allocator recycles the pinned buffers
    once the copies that used them have finished."""

    def __init__(self, clf: Classifier, device: str, precision: str, batch_rows: int):
        import torch

        super().__init__("torch", precision, clf.steps[-1].weight.shape[1], batch_rows)
        self.torch, self.device = torch, torch.device(device)
        self.dtype = getattr(torch, TORCH_DTYPES[precision])
        self.steps = _torch_steps(clf, self.device, self.dtype)
        self.copy_stream, self.compute_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)

    def prepare(self, vectors: "np.ndarray | list[np.ndarray]") -> Any:
        pinned = self.torch.empty(stacked_shape(vectors), dtype=self.torch.float16, pin_memory=True)
        copy_rows(vectors, pinned.numpy())
        return pinned

    def forward(self, x: Any) -> Any:
        """fp16 device rows -> float32 outputs on the device, batch_rows at a time (bounded temporaries)."""
        torch = self.torch
        out = torch.empty((len(x), self.width), dtype=torch.float32, device=self.device)
        for i in range(0, len(x), self.batch_rows):
            h = x[i:i + self.batch_rows].to(self.dtype)
            for weight, bias, act in self.steps:
                h = act(torch.addmm(bias, h, weight))
            out[i:i + self.batch_rows] = h
        return out

    def submit(self, staged: Any) -> Waiter:
        torch = self.torch
        with torch.inference_mode():
            with torch.cuda.stream(self.copy_stream):
                x = staged.to(self.device, non_blocking=True)
            self.compute_stream.wait_stream(self.copy_stream)
            with torch.cuda.stream(self.compute_stream):
                x.record_stream(self.compute_stream)  # allocated on the copy stream, freed after the forward
                out = self.forward(x)
                host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(out, non_blocking=True)
                done = torch.cuda.Event(blocking=True)  # writer threads sleep on it instead of spinning a core
                done.record(self.compute_stream)

        def wait() -> np.ndarray:
            done.synchronize()
            return host.numpy()

        return wait


def check_options(engine: str, device: str, precision: str) -> None:
    """Every check that needs no torch, so a wrong option fails before any heavy import."""
    if precision not in TORCH_DTYPES:
        raise BadInput(f"unknown precision {precision!r} (use {', '.join(TORCH_DTYPES)})")
    if engine not in ("auto", "numpy", "torch"):
        raise BadInput(f"unknown scoring engine {engine!r} (numpy, torch)")
    if engine == "numpy" and precision != "fp32":
        raise BadInput("the numpy engine computes in fp32 only; use --engine torch for bf16/fp16")
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise BadInput(f"unknown device {device!r} (cpu, cuda, cuda:N or auto)")


def _resolve(engine: str, device: str, precision: str) -> tuple[str, str]:
    check_options(engine, device, precision)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if engine == "auto":
        engine = "torch" if device.startswith("cuda") or precision != "fp32" else "numpy"
    return engine, device


def engine_name(engine: str, device: str, precision: str) -> str:
    """The engine `make_engine` would build for these options, without building it."""
    return _resolve(engine, device, precision)[0]


def make_engine(clf: Classifier, engine: str = "auto", device: str = "cpu", precision: str = "fp32",
                batch_rows: int = BATCH_ROWS) -> Engine:
    """auto: numpy for fp32 on CPU (exact, folded); torch on CUDA or for bf16. device auto: CUDA if torch sees one."""
    engine, device = _resolve(engine, device, precision)
    width = clf.steps[-1].weight.shape[1]
    if engine == "numpy":
        return Engine("numpy", precision, width, batch_rows, _numpy_run(clf))
    if device.startswith("cuda"):
        return CudaEngine(clf, device, precision, batch_rows)
    return Engine("torch", precision, width, batch_rows, _torch_cpu_run(clf, precision))
