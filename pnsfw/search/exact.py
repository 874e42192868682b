"""Exact inner-product search with torch: the store's vectors kept on a device, one matmul + topk per batch.

For the API on a CUDA machine whose faiss has no GPUs: 1M x 256 fp16 is 512 MB of
device memory, and a micro-batch of queries costs one GEMM over it plus a top-k.
`TorchExact` has the part of a FAISS index's interface the searcher uses
(`search(queries, k) -> (similarities, ids)`, `ntotal`), so it stands in for one.

Precision: on CUDA the vectors (already fp16 in the store) and the queries are
fp16 and the GEMM accumulates in fp32 (cuBLAS), results rounded to fp16: a
similarity differs from the fp32 flat index's by <= ~1e-3, so ids can swap
only between neighbours whose similarities are that close. On the CPU (the test
stand-in) vectors and queries are fp32: equal to the flat index up to float
summation order (~1e-6).
"""

from typing import Any

import numpy as np

SCORES_BUDGET = 256 * 1024 * 1024  # bytes of one (queries x rows) similarity block


def resolve_device(device: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; other names pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchExact:
    """Exact search over (ids, vectors) on `device`; vectors are unit rows (fp16 or fp32)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors)).to(self.device, self.dtype)
        self.ntotal = int(len(self.ids))
        self.d = int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def describe(self) -> dict[str, Any]:
        name = str(self.device)
        if self.device.type == "cuda":
            import torch

            name = torch.cuda.get_device_name(self.device)
        return {"backend": "torch-exact", "device": str(self.device), "device_name": name,
                "dtype": str(self.dtype).replace("torch.", ""), "ntotal": self.ntotal,
                "bytes": self.ntotal * self.d * self.vectors.element_size()}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 (n, k), store ids int64 (n, k)), best first; -1 ids past ntotal."""
        import torch

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, k_real = len(queries), min(k, self.ntotal)
        sims = np.full((n, k), -np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        if not n or not k_real:
            return sims, ids
        with torch.inference_mode():
            q = torch.from_numpy(queries).to(self.device, self.dtype, non_blocking=True)
            top_sims, top_rows = self._topk(q, k_real)
            top_sims, top_rows = top_sims.float().cpu().numpy(), top_rows.cpu().numpy()
        sims[:, :k_real], ids[:, :k_real] = top_sims, self.ids[top_rows]
        return sims, ids

    def _topk(self, q: Any, k: int) -> tuple[Any, Any]:
        """Top-k over row blocks small enough that one block of similarities fits SCORES_BUDGET."""
        import torch

        block = max(k, SCORES_BUDGET // (len(q) * self.vectors.element_size()))
        if block >= self.ntotal:
            return torch.topk(q @ self.vectors.T, k, dim=1)
        best_sims, best_rows = [], []
        for start in range(0, self.ntotal, block):
            part = q @ self.vectors[start:start + block].T
            s, r = torch.topk(part, min(k, part.shape[1]), dim=1)
            best_sims.append(s)
            best_rows.append(r + start)
        s, at = torch.topk(torch.cat(best_sims, dim=1), k, dim=1)
        return s, torch.gather(torch.cat(best_rows, dim=1), 1, at)
