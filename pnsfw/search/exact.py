"""Exact inner-product search with torch over every stored vector, tiled so memory stays bounded.

`TorchExact` has the part of a FAISS index's interface the searcher uses (`search(queries, k) ->
(similarities, ids)`, `ntotal`), so it stands in for one (`serve --search exact`, `search --device`).
The database is split into shards (one per device: `cuda:all` or `cuda:0,cuda:1` spreads it over GPUs),
each held on its device, or, when it does not fit there, in pinned host memory and streamed to the
device block by block on a side stream while the previous block is searched. Queries go in blocks of
QUERY_BLOCK; each (query block, database block) tile is one GEMM reduced on the device (tiles.py), and
partial top-k are merged on the device. Small batches on one resident CUDA shard are replayed as CUDA
graphs (padded to GRAPH_BATCHES), so a query costs the kernels and not their launches.

Precision: on CUDA the rows are fp16 (as in the store); the first stage multiplies fp16 queries and rows
with fp32 accumulation; the winners are scored again in fp32 from the fp16 rows, so similarities equal
the flat fp32 index's over the same vectors (to summation order) and ids can differ only between
neighbours whose similarities are within fp16 noise (~1e-3). On the CPU (the test stand-in) everything
is fp32. The Triton kernel (tiles.py) is used on CUDA when Triton is installed and dim is a power of two
<= 256; otherwise the first stage is a torch GEMM per tile.
"""

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..devices import auto_device
from .tiles import GROUP, block_topk, group_maxima, merge_topk

log = logging.getLogger("pnsfw.search")

QUERY_BLOCK = 4096  # queries per tile
SCORES_BUDGET = 1 << 30  # bytes of one tile's first-stage output (the torch kernel: its whole score block)
STREAM_BLOCK = 1 << 30  # bytes of database rows copied to a device at once when streamed from host memory
MEMORY_RESERVE = 4 << 30  # device bytes kept free when deciding whether a shard fits on its device
GRAPH_BATCHES = (16, 64)  # small batches padded to these sizes and replayed as CUDA graphs
COPY_ROWS = 1 << 20  # rows converted and copied at once while loading


def resolve_device(device: str) -> str:
    """auto -> devices.auto_device(); other names pass through."""
    return auto_device() if device == "auto" else device


def resolve_devices(device: str) -> list[Any]:
    """One device name, a comma-separated list, or cuda:all (every visible GPU), as torch devices; a bare
    `cuda` is the current GPU by index, so tensors already there compare equal."""
    import torch

    if device == "cuda:all":
        count = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(count)] if count else [torch.device("cpu")]
    names = [d.strip() for d in resolve_device(device).split(",") if d.strip()]
    devices = [torch.device(name) for name in names]
    return [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
            for d in devices]


def resolve_kernel(kernel: str, device: Any, dim: int) -> str:
    """auto -> triton on CUDA when it is importable and dim suits it, else torch."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be auto, torch or triton, got {kernel!r}")
    if kernel != "auto":
        return kernel
    if device.type != "cuda" or dim & (dim - 1) or not 16 <= dim <= 256:
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        log.info("exact search: Triton is not importable (%s); the first stage is a torch GEMM per tile", exc)
        return "torch"
    return "triton"


@dataclass
class Shard:
    """Rows [start, start + rows) of the database: `data` holds them padded to a multiple of GROUP rows, on
    `device` (resident) or in host memory (pinned for CUDA), streamed to the device per search."""

    device: Any
    start: int
    rows: int
    data: Any
    resident: bool


def on_device(device: Any) -> Any:
    """A context that makes `device` current (Triton launches on the current device), for CUDA devices."""
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fits(part: Any, nbytes: int, device: Any) -> bool:
    import torch

    if device.type != "cuda" or (isinstance(part, torch.Tensor) and part.device == device):
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free - MEMORY_RESERVE


def padded_rows(part: Any, device: Any, dtype: Any, pin: bool) -> Any:
    """`part` (numpy or torch rows) as a (rows rounded up to GROUP, dim) tensor on device; no copy if it is one."""
    import torch

    rows = len(part)
    padded = -(-rows // GROUP) * GROUP
    if (isinstance(part, torch.Tensor) and part.device == device and part.dtype == dtype and rows == padded
            and part.is_contiguous()):
        return part
    out = torch.zeros((padded, part.shape[1]), dtype=dtype, device=device, pin_memory=pin)
    for s in range(0, rows, COPY_ROWS):
        chunk = part[s:s + COPY_ROWS]
        out[s:s + len(chunk)].copy_(torch.as_tensor(chunk))
    return out


def make_shards(vectors: Any, devices: list[Any], dtype: Any, resident: "bool | None") -> list[Shard]:
    """Contiguous row ranges, one per device; resident=None keeps a shard on its device when it fits."""
    import torch

    n = len(vectors)
    per = -(-max(n, 1) // len(devices) // GROUP) * GROUP if n else 0
    shards = []
    for i, device in enumerate(devices):
        start = min(i * per, n)
        part = vectors[start:start + per]
        nbytes = -(-len(part) // GROUP) * GROUP * vectors.shape[1] * dtype.itemsize
        here = _fits(part, nbytes, device) if resident is None else resident
        host = torch.device("cpu")
        data = padded_rows(part, device if here else host, dtype, pin=not here and device.type == "cuda")
        shards.append(Shard(device, start, len(part), data, here))
    return [s for s in shards if s.rows] or shards[:1]


class TorchExact:
    """Exact search over (ids, vectors) on `device`; vectors are unit rows (numpy or torch, fp16 or fp32)."""

    def __init__(self, ids: np.ndarray, vectors: Any, device: str = "cpu", *, kernel: str = "auto",
                 resident: "bool | None" = None, graphs: bool = True, block_rows: "int | None" = None):
        import torch

        devices = resolve_devices(device)
        self.device = devices[0]
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.ids = np.asarray(ids, dtype=np.int64)
        self.ntotal = int(len(self.ids))
        self.d = int(vectors.shape[1]) if vectors.ndim == 2 else 0
        self.kernel = resolve_kernel(kernel, self.device, self.d)
        self.block_rows = block_rows
        self.shards = make_shards(vectors, devices, self.dtype, resident)
        single = len(self.shards) == 1 and self.shards[0].resident and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int], Any] | None = {} if graphs and single else None
        self._lock = threading.Lock()
        self._streams: dict[Any, Any] = {}
        if self.kernel == "triton" and self.device.type == "cuda" and self.ntotal:
            self._check_kernel()

    def describe(self) -> dict[str, Any]:
        name = str(self.device)
        if self.device.type == "cuda":
            import torch

            name = torch.cuda.get_device_name(self.device)
        return {"backend": "torch-exact", "device": ",".join(str(s.device) for s in self.shards),
                "device_name": name, "dtype": str(self.dtype).replace("torch.", ""), "ntotal": self.ntotal,
                "bytes": self.ntotal * self.d * self.dtype.itemsize, "kernel": self.kernel,
                "shards": len(self.shards), "resident": all(s.resident for s in self.shards)}

    def _check_kernel(self) -> None:
        """Compile the Triton kernel once on a few rows against the torch GEMM; fall back to torch if it fails."""
        import torch

        shard = self.shards[0]
        rows = min(shard.rows, 4096)
        block = shard.data[:-(-rows // GROUP) * GROUP].to(self.device)
        q = block[:1].clone()
        try:
            from .triton_kernel import CONFIGS
            from .triton_kernel import group_maxima as triton_maxima

            with on_device(self.device):  # one fixed configuration: tuning happens on real work
                got = triton_maxima(q, block, rows, GROUP, CONFIGS[16][0])
            want = group_maxima(q, block, rows, "torch")
            torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
        except Exception as exc:  # a Triton/driver mismatch must not take exact search down
            log.warning("exact search: the Triton kernel failed (%s); using torch GEMM tiles",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.kernel = "torch"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 (n, k), store ids int64 (n, k)), best first; -1 ids past ntotal."""
        import torch

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, k_real = len(queries), min(k, self.ntotal)
        sims = np.full((n, k), -np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        if not n or not k_real:
            return sims, ids
        with self._lock, torch.inference_mode():
            graphed = self._graphed(queries, k_real) if self.graphs is not None and n <= GRAPH_BATCHES[-1] else None
            if graphed is not None:
                top_sims, top_rows = graphed
            else:
                parts = [self._query_block(torch.from_numpy(queries[s:s + QUERY_BLOCK]), k_real)
                         for s in range(0, n, QUERY_BLOCK)]
                top_sims, top_rows = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        sims[:, :k_real], ids[:, :k_real] = top_sims.numpy(), self.ids[top_rows.numpy()]
        return sims, ids

    def _query_block(self, q32: Any, k: int) -> tuple[Any, Any]:
        """Top-k of one block of queries (host fp32) over every shard, merged on the first device; on the host."""
        parts = [self._shard_topk(shard, q32.to(shard.device, non_blocking=True), k) for shard in self.shards]
        best = None
        for sims, rows in parts:  # every shard's work is queued before the first result is waited for
            best = merge_topk(best, (sims.to(self.device), rows.to(self.device)), k)
        assert best is not None
        return best[0].cpu(), best[1].cpu()

    def _shard_topk(self, shard: Shard, q32: Any, k: int) -> tuple[Any, Any]:
        """Top-k (sims, global rows) of queries already on the shard's device, block by block."""
        q = q32.to(self.dtype)
        best = None
        with on_device(shard.device):
            for block, valid, offset in self._blocks(shard, len(q)):
                sims, rows = block_topk(q, q32, block, valid, k, self.kernel)
                best = merge_topk(best, (sims, rows + (shard.start + offset)), k)
        assert best is not None
        return best

    def _tile_rows(self, n_queries: int, resident: bool) -> int:
        """Database rows per tile: the first stage's output of a tile stays within SCORES_BUDGET."""
        if self.block_rows is not None:
            return max(GROUP, self.block_rows // GROUP * GROUP)
        per_row = n_queries * (4 / GROUP if self.kernel == "triton" else self.dtype.itemsize + 4 / GROUP)
        rows = int(SCORES_BUDGET / per_row)
        if not resident:
            rows = min(rows, STREAM_BLOCK // (self.d * self.dtype.itemsize))
        return max(GROUP, rows // GROUP * GROUP)

    def _blocks(self, shard: Shard, n_queries: int) -> Iterator[tuple[Any, int, int]]:
        """(block on the shard's device, valid rows in it, its first row in the shard)."""
        rows = self._tile_rows(n_queries, shard.resident)
        if shard.resident:
            for off in range(0, shard.rows, rows):
                yield shard.data[off:off + rows], min(rows, shard.rows - off), off
        else:
            yield from stream_blocks(shard, rows, self._copy_stream(shard.device))

    def _copy_stream(self, device: Any) -> Any:
        import torch

        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _graphed(self, queries: np.ndarray, k: int) -> "tuple[Any, Any] | None":
        """Replay the CUDA graph of the smallest GRAPH_BATCHES size that holds the queries (captured once);
        None when graphs cannot be captured here."""
        import torch

        n = len(queries)
        size = next(b for b in GRAPH_BATCHES if b >= n)
        assert self.graphs is not None
        if (size, k) not in self.graphs:
            try:
                self.graphs[(size, k)] = self._capture(size, k)
            except RuntimeError as exc:  # graphs are an optimisation: search on without them
                log.warning("exact search: CUDA graph capture failed (%s); searching without graphs",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.graphs = None
                return None
        assert self.graphs is not None
        static_q, (sims, rows), graph = self.graphs[(size, k)]
        static_q[:n].copy_(torch.from_numpy(queries))
        graph.replay()
        return sims[:n].cpu(), rows[:n].cpu()

    def _capture(self, size: int, k: int) -> tuple[Any, Any, Any]:
        import torch

        shard = self.shards[0]
        static_q = torch.zeros((size, self.d), dtype=torch.float32, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the graph: compiles and tunes the kernels
            for _ in range(2):
                self._shard_topk(shard, static_q, k)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU
            out = self._shard_topk(shard, static_q, k)
        return static_q, out, graph


def stream_blocks(shard: Shard, rows: int, copy: Any) -> Iterator[tuple[Any, int, int]]:
    """Blocks of a host-resident shard on its device: block i+1 is copied on the `copy` stream into the other
    of two buffers while block i is searched; events order the copy after the search that last read it."""
    import torch

    starts = list(range(0, shard.rows, rows))
    if copy is None:  # the CPU stand-in: the same blocks, copied in turn
        for off in starts:
            yield shard.data[off:off + rows].to(shard.device), min(rows, shard.rows - off), off
        return
    compute = torch.cuda.current_stream(shard.device)
    copy.wait_stream(compute)  # the buffers' memory may still be in use by earlier work on `compute`
    buffers = [torch.empty((rows, shard.data.shape[1]), dtype=shard.data.dtype, device=shard.device)
               for _ in range(min(2, len(starts)))]
    freed: list[Any] = [None, None]

    def issue(i: int) -> Any:
        off, ready = starts[i], torch.cuda.Event()
        with torch.cuda.stream(copy):
            if freed[i % 2] is not None:
                copy.wait_event(freed[i % 2])
            part = shard.data[off:off + rows]
            buffers[i % 2][:len(part)].copy_(part, non_blocking=True)
            ready.record(copy)
        return ready

    ready = issue(0)
    for i, off in enumerate(starts):
        following = issue(i + 1) if i + 1 < len(starts) else None
        compute.wait_event(ready)
        size = min(rows, len(shard.data) - off)
        yield buffers[i % 2][:size], min(rows, shard.rows - off), off
        freed[i % 2] = torch.cuda.Event()
        freed[i % 2].record(compute)
        ready = following
