"""The tiled exact search and dedup kernels on the CPU (small tiles, several shards, streamed blocks) against
FAISS's flat index and range search; the Triton kernel in Triton's interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pnsfw.search import exact, tiles
from pnsfw.search.dedup import exact_cpu_pairs, exact_torch_pairs, group_pairs, keepers

ROOT = Path(__file__).resolve().parents[1]


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fp16 rows (with exact copies, so there are ties), queries (some are rows), flat FAISS top-20."""
    import faiss

    rows = unit(3001, 32, 0)
    rows[2000:2010] = rows[:10]  # exact duplicates: tied similarities
    rows = rows.astype(np.float16)
    queries = np.concatenate([unit(40, 32, 1), rows[:6].astype(np.float32), rows[2500:2504].astype(np.float32)])
    flat = faiss.IndexFlatIP(32)
    flat.add(rows.astype(np.float32))
    sims, found = flat.search(queries, 20)
    return rows, queries, sims, found


def assert_like_flat(got: tuple[np.ndarray, np.ndarray], flat_sims: np.ndarray, flat_rows: np.ndarray,
                     ids: np.ndarray) -> None:
    """Similarities equal the flat index's; ids equal wherever a similarity is not tied with a neighbour."""
    sims, found = got
    np.testing.assert_allclose(sims, flat_sims, atol=1e-5)
    gaps = np.abs(np.diff(flat_sims, axis=1)) > 1e-5
    alone = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], gaps[:, -1:]], axis=1)
    assert (found == ids[flat_rows])[alone].all()
    assert alone.mean() > 0.5  # the comparison is not vacuous


@pytest.mark.parametrize("options", [
    {},  # one tile
    {"block_rows": 192},  # 16 database tiles, the last one partial
    {"block_rows": 256, "resident": False},  # streamed from host memory
    {"device": "cpu,cpu,cpu", "block_rows": 320},  # three shards, merged
])
def test_tiled_search_equals_the_flat_index(data: tuple, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, queries, flat_sims, flat_rows = data
    monkeypatch.setattr(exact, "QUERY_BLOCK", 16)  # several query blocks
    monkeypatch.setattr(tiles, "DIRECT_TOPK", 8)  # the second-level selection over group maxima
    monkeypatch.setattr(tiles, "FAN", 4)
    monkeypatch.setattr(tiles, "RESCORE_BUDGET", 20 * 64 * 32 * 4 * 7)  # re-scoring in chunks of 7 queries
    ids = np.arange(len(rows)) * 3 + 7
    index = exact.TorchExact(ids, rows, **{"device": "cpu", **options})
    assert index.describe()["shards"] == len(options.get("device", "cpu").split(","))
    assert index.describe()["resident"] == options.get("resident", True)
    assert_like_flat(index.search(queries, 20), flat_sims, flat_rows, ids)


def test_top_groups_finds_the_k_largest() -> None:
    import torch

    values = torch.from_numpy(np.random.default_rng(3).standard_normal((5, 10_000)).astype(np.float32))
    values[0, 17:23] = 9.0  # several winners in one group of FAN
    for direct, fan in ((8192, 32), (64, 8), (8, 4)):
        tiles.DIRECT_TOPK, tiles.FAN = direct, fan
        try:
            chosen = tiles.top_groups(values, 10)
        finally:
            tiles.DIRECT_TOPK, tiles.FAN = 8192, 32
        want = torch.topk(values, 10, dim=1).indices
        assert [sorted(r) for r in chosen.tolist()] == [sorted(r) for r in want.tolist()]


def test_pads_with_minus_one_and_empty_queries(data: tuple) -> None:
    rows = data[0]
    sims, found = exact.TorchExact(np.arange(100, 105), rows[:5]).search(data[1][:3], 8)
    assert (found[:, 5:] == -1).all() and np.isinf(sims[:, 5:]).all() and (found[:, :5] >= 100).all()
    assert exact.TorchExact(np.arange(5), rows[:5]).search(np.zeros((0, 32), np.float32), 3)[1].shape == (0, 3)


def test_dedup_pairs_from_tiles_equal_faiss_range_search() -> None:
    rows = unit(1500, 32, 5)
    copies = np.random.default_rng(6).choice(1500, 40, replace=False)
    rows[copies[:20]] = rows[copies[20:]] + 0.02 * unit(20, 32, 7)  # near-duplicates
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)

    def pairs(found: object) -> dict[tuple[int, int], float]:
        return {(i, j): s for a, b, c in found for i, j, s in zip(a.tolist(), b.tolist(), c.tolist())}

    want = pairs(exact_cpu_pairs(rows, 0.9))
    got = pairs(exact_torch_pairs(rows, 0.9, device="cpu", block_rows=128))
    assert set(got) == set(want) and len(want) >= 20
    assert all(abs(got[p] - want[p]) < 1e-5 and p[0] < p[1] for p in want)


def test_groups_nearest_and_keepers() -> None:
    pairs = iter([(np.array([0, 1]), np.array([1, 2]), np.array([0.97, 0.99], np.float32)),
                  (np.array([4]), np.array([6]), np.array([0.96], np.float32))])
    groups, nearest, sims = group_pairs(7, pairs)
    assert groups.tolist() == [0, 0, 0, -1, 1, -1, 1]
    assert nearest.tolist() == [1, 2, 1, -1, 6, -1, 4] and sims[1] == pytest.approx(0.99)
    ids = np.array([50, 10, 30, 0, 5, 1, 6])
    area = np.array([100, 100, 100, 0, 10, 0, 20])
    # group 0: equal areas -> the lowest id (row 1, id 10); group 1: the larger image (row 6)
    assert keepers(groups, ids, area).tolist() == [1, 1, 1, -1, 6, -1, 6]


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from pnsfw.search import tiles, triton_kernel
    torch.manual_seed(0)
    for bn in (64, 128):  # BN == GROUP, and two groups per tile (the reshape)
        triton_kernel.INTERPRETED = {"BQ": 16, "BN": bn}
        for b, n in ((1, 1000), (21, 4096), (17, 333)):
            q = torch.nn.functional.normalize(torch.randn(b, 32), dim=1).half()
            x = torch.nn.functional.normalize(torch.randn(-(-n // 64) * 64, 32), dim=1).half()
            got = tiles.group_maxima(q, x, n, "triton")
            want = tiles.group_maxima(q.float(), x.float(), n, "torch")
            assert got.shape == want.shape, (got.shape, want.shape)
            torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    print("kernel ok")
""")


def test_triton_kernel_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stderr[-3000:]
