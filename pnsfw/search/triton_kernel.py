"""The first stage of tiles.py as one Triton kernel: GEMM tile -> max per group of rows, in registers.

Each program keeps its block of queries and walks database tiles (a strided share of them, so the
programs that share a database tile read it at about the same time and it is served from L2); a tile's
similarities never leave the multiprocessor, only one fp32 maximum per query per GROUP rows is written
(1/128 of the bytes of an fp16 score matrix at GROUP 64). Imported only where Triton is used; on a CPU
tensor the kernel runs in Triton's interpreter (tests), with one fixed configuration.
"""

from typing import Any

import triton
import triton.language as tl


@triton.jit
def _group_max_kernel(q_ptr, x_ptr, out_ptr, n_queries, n_valid, n_groups,
                      D: tl.constexpr, G: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr):
    rows_q = tl.program_id(0) * BQ + tl.arange(0, BQ)
    dims = tl.arange(0, D)
    q_mask = rows_q[:, None] < n_queries
    q = tl.load(q_ptr + rows_q.to(tl.int64)[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
    out_rows = out_ptr + rows_q.to(tl.int64)[:, None] * n_groups
    for t in range(tl.program_id(1), tl.cdiv(n_valid, BN), tl.num_programs(1)):
        rows_x = t * BN + tl.arange(0, BN)
        x = tl.load(x_ptr + rows_x.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=rows_x[:, None] < n_valid, other=0.0)
        acc = tl.dot(q, tl.trans(x))
        acc = tl.where(rows_x[None, :] < n_valid, acc, float("-inf"))
        if BN == G:
            best = tl.max(acc, axis=1, keep_dims=True)
        else:
            best = tl.max(tl.reshape(acc, (BQ, BN // G, G)), axis=2)
        cols = t * (BN // G) + tl.arange(0, BN // G)
        tl.store(out_rows + cols[None, :], best, mask=q_mask & (cols[None, :] < n_groups))


def _config(bq: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BQ": bq, "BN": bn}, num_warps=warps, num_stages=stages)


# Shared memory per program: the query block (BQ x 256 fp16) + `stages` database tiles (BN x 256 fp16).
CONFIGS = {
    16: [_config(16, 64, 4, 4), _config(16, 128, 4, 3)],
    64: [_config(64, 64, 4, 4), _config(64, 128, 4, 2)],
    0: [_config(128, 64, 4, 3), _config(128, 128, 8, 2), _config(256, 64, 8, 2)],
}
TUNED = {bucket: triton.autotune(configs, key=["D", "G"])(_group_max_kernel) for bucket, configs in CONFIGS.items()}
INTERPRETED = {"BQ": 16, "BN": 64}
PROGRAMS_PER_SM = 1  # programs per SM in the grid (rounded down to whole query blocks)


def _bucket(n_queries: int) -> int:
    return 16 if n_queries <= 16 else 64 if n_queries <= 64 else 0


def _grid(n_queries: int, n_valid: int, sms: int) -> Any:
    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        blocks = triton.cdiv(n_queries, meta["BQ"])
        # whole waves: a program holds 100-200 KB of shared memory, one per SM; a last partial wave idles SMs
        return blocks, max(1, min(triton.cdiv(n_valid, meta["BN"]), sms * PROGRAMS_PER_SM // blocks))
    return grid


def group_maxima(q: Any, block: Any, n_valid: int, group: int, config: "triton.Config | None" = None) -> Any:
    """(B, ceil(n_valid / group)) fp32: max over each group of rows of q @ block.T (q, block: same dtype);
    tuned per batch-size bucket on first use, or with one fixed `config`."""
    import torch

    if q.dtype != block.dtype or not (q.is_contiguous() and block.is_contiguous()):
        raise ValueError("group_maxima needs contiguous queries and rows of one dtype")
    n_queries, dim = q.shape
    n_groups = triton.cdiv(n_valid, group)
    out = torch.empty((n_queries, n_groups), dtype=torch.float32, device=q.device)
    if q.device.type == "cpu":  # Triton's interpreter
        grid = _grid(n_queries, n_valid, 1)(INTERPRETED)
        _group_max_kernel[grid](q, block, out, n_queries, n_valid, n_groups, D=dim, G=group, **INTERPRETED)
        return out
    grid = _grid(n_queries, n_valid, torch.cuda.get_device_properties(q.device).multi_processor_count)
    with torch.cuda.device(q.device):  # Triton launches on the current device
        if config is None:
            TUNED[_bucket(n_queries)][grid](q, block, out, n_queries, n_valid, n_groups, D=dim, G=group)
        else:
            _group_max_kernel[grid(config.kwargs)](q, block, out, n_queries, n_valid, n_groups, D=dim, G=group,
                                                  num_warps=config.num_warps, num_stages=config.num_stages,
                                                  **config.kwargs)
    return out


def tuning() -> dict[str, Any]:
    """The configuration chosen per batch-size bucket and each one's time (ms), for the benchmark's report."""
    out = {}
    for bucket, tuner in TUNED.items():
        timings = getattr(tuner, "configs_timings", None) or {}
        out[str(bucket or "large")] = {"best": str(getattr(tuner, "best_config", None)),
                                       "ms": {str(c): t for c, t in timings.items()}}
    return out
