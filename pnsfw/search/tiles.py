"""Tiled exact inner-product search: one GEMM per (query block, database block), reduced on the device.

No tile ever holds a full (queries x rows) similarity matrix past its GEMM:

1. `group_maxima`: each query's best similarity in every GROUP consecutive rows of the block (the Triton
   kernel keeps the GEMM tile in registers and writes only those maxima, fp32 from fp16 x fp16 products;
   the torch stand-in runs the GEMM per block and reduces it at once).
2. `top_groups`: the k groups with the largest maxima. This loses no neighbour: the k best groups hold k
   distinct rows, so the k-th best similarity t is >= the k-th largest group maximum, and a row of
   similarity >= t lies in a group whose maximum is >= t, i.e. among the chosen ones (ties aside). The
   same argument is applied again over maxima of FAN groups while rows of maxima are long.
3. `rescore`: the k x GROUP rows of the chosen groups are scored again (fp16 batched GEMV), and the best
   2k of those once more in fp32 from the fp16 rows, so similarities equal a flat fp32 index's over the
   stored vectors (to summation order), and ids differ only where similarities are within fp16 noise.

Blocks are views of the database whose row count is a multiple of GROUP (rows past `n_valid` are padding
and never returned). Partial top-k of blocks, shards and devices are merged with `merge_topk`.
`pairs_above` is the same first stage for dedup: only groups whose maximum reaches the threshold are
scored again, so only pairs above it leave the device.
"""

from collections.abc import Callable, Iterator
from typing import Any

GROUP = 64  # rows of the database reduced to one maximum per query by the first stage
FAN = 32  # groups per second-level maximum in `top_groups`
DIRECT_TOPK = 8192  # rows of maxima short enough for one torch.topk
RESCORE_BUDGET = 256 * 1024 * 1024  # bytes of gathered rows re-scored at once
PAIRS_CHUNK = 4096  # (query, group) candidates re-scored at once by `pairs_above`
SLACK = 2e-3  # first-stage maxima may be fp16-rounded (torch kernel): candidates from threshold - SLACK


def _maxima_torch(q: Any, block: Any, n_valid: int) -> Any:
    """(B, n_groups) fp32: the GEMM of the block in the storage dtype (fp32 accumulate), max per group."""
    import torch

    groups = -(-n_valid // GROUP)
    scores = q @ block[:groups * GROUP].T
    if n_valid < groups * GROUP:
        scores[:, n_valid:] = float("-inf")
    return scores.view(len(q), groups, GROUP).amax(dim=2).to(torch.float32)


def _maxima_triton(q: Any, block: Any, n_valid: int) -> Any:
    from .triton_kernel import group_maxima

    return group_maxima(q, block, n_valid, GROUP)


MAXIMA: dict[str, Callable[[Any, Any, int], Any]] = {"torch": _maxima_torch, "triton": _maxima_triton}


def group_maxima(q: Any, block: Any, n_valid: int, kernel: str) -> Any:
    """(B, ceil(n_valid / GROUP)) fp32 best similarity of each query in each group of the block."""
    return MAXIMA[kernel](q, block, n_valid)


def top_groups(values: Any, k: int) -> Any:
    """(B, min(k, M)) column indices of the k largest values of each row of `values` (B, M), any order."""
    import torch

    b, m = values.shape
    if m <= DIRECT_TOPK:
        return torch.topk(values, min(k, m), dim=1, sorted=False).indices
    width = -(-m // FAN)
    if width * FAN != m:
        values = torch.nn.functional.pad(values, (0, width * FAN - m), value=float("-inf"))
    # super-group u = columns u, u + width, u + 2 width, ...: any partition will do, and this one reduces
    # over an outer dimension (coalesced), ~8x faster than over 32 adjacent columns
    upper = top_groups(values.view(b, FAN, width).amax(dim=1), k)
    cand = (upper[:, :, None] + width * torch.arange(FAN, device=values.device)).view(b, -1)
    chosen = torch.topk(values.gather(1, cand), min(k, cand.shape[1]), dim=1, sorted=False).indices
    return cand.gather(1, chosen)


def _exact(q32: Any, block: Any, rows: Any) -> Any:
    """(B, C) fp32 similarities of each query with its C rows of the block (rows (B, C) int64)."""
    import torch

    vecs = block[rows.reshape(-1)].view(*rows.shape, -1).to(torch.float32)
    return torch.bmm(vecs, q32[:, :, None]).squeeze(2)


def _rescore_part(q: Any, q32: Any, block: Any, n_valid: int, groups: Any, k: int) -> tuple[Any, Any]:
    import torch

    b, chosen = groups.shape
    rows = (groups[:, :, None] * GROUP + torch.arange(GROUP, device=groups.device)).view(b, chosen * GROUP)
    vecs = block.view(-1, GROUP, block.shape[1])[groups].view(b, chosen * GROUP, -1)
    sims = torch.bmm(vecs, q[:, :, None]).squeeze(2)
    sims = sims.masked_fill(rows >= n_valid, float("-inf"))
    wide = torch.topk(sims, min(2 * k, sims.shape[1]), dim=1, sorted=False).indices
    rows = rows.gather(1, wide)
    exact = _exact(q32, block, rows.clamp(max=max(n_valid - 1, 0))).masked_fill(rows >= n_valid, float("-inf"))
    top = torch.topk(exact, min(k, exact.shape[1]), dim=1)
    return top.values, rows.gather(1, top.indices)


def rescore(q: Any, q32: Any, block: Any, n_valid: int, groups: Any, k: int) -> tuple[Any, Any]:
    """(sims fp32 (B, k'), block rows int64 (B, k')) best first: the chosen groups' rows scored again."""
    import torch

    per_query = groups.shape[1] * GROUP * block.shape[1] * block.element_size()
    step = max(1, RESCORE_BUDGET // max(per_query, 1))
    if step >= len(q):
        return _rescore_part(q, q32, block, n_valid, groups, k)
    parts = [_rescore_part(q[s:s + step], q32[s:s + step], block, n_valid, groups[s:s + step], k)
             for s in range(0, len(q), step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def block_topk(q: Any, q32: Any, block: Any, n_valid: int, k: int, kernel: str) -> tuple[Any, Any]:
    """Exact top-k of queries (q in the block's dtype, q32 fp32) in the first n_valid rows of `block`."""
    maxima = group_maxima(q, block, n_valid, kernel)
    return rescore(q, q32, block, n_valid, top_groups(maxima, k), k)


def merge_topk(best: "tuple[Any, Any] | None", part: tuple[Any, Any], k: int) -> tuple[Any, Any]:
    """The k best of two partial results (sims, rows), best first."""
    import torch

    if best is None:
        return part
    sims, rows = torch.cat([best[0], part[0]], dim=1), torch.cat([best[1], part[1]], dim=1)
    top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    return top.values, rows.gather(1, top.indices)


def pairs_above(q: Any, q32: Any, block: Any, n_valid: int, threshold: float,
                kernel: str) -> Iterator[tuple[Any, Any, Any]]:
    """(query index, block row, similarity fp32) of every pair with similarity >= threshold, in chunks."""
    import torch

    maxima = group_maxima(q, block, n_valid, kernel)
    qi, gi = torch.nonzero(maxima >= threshold - SLACK, as_tuple=True)
    offsets = torch.arange(GROUP, device=block.device)
    grouped = block.view(-1, GROUP, block.shape[1])
    for s in range(0, len(qi), PAIRS_CHUNK):
        qc, gc = qi[s:s + PAIRS_CHUNK], gi[s:s + PAIRS_CHUNK]
        sims = torch.bmm(grouped[gc].to(torch.float32), q32[qc][:, :, None]).squeeze(2)
        rows = gc[:, None] * GROUP + offsets
        p, g = torch.nonzero((sims >= threshold) & (rows < n_valid), as_tuple=True)
        yield qc[p], rows[p, g], sims[p, g]
