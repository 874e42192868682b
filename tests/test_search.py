"""Search, explain and dedup over the FAISS index (tiny random CLIP, real FAISS)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import index_folder
from PIL import Image
from terminal import on_a_terminal

from pnsfw.cli import cli
from pnsfw.errors import BadInput, NotFound, SpaceMismatch, StoreError
from pnsfw.search import index as faiss_index
from pnsfw.search.dedup import find_groups
from pnsfw.search.explain import explain_vector
from pnsfw.search.query import Searcher
from pnsfw.store import Store
from pnsfw.store.projection import l2_normalize


def block_images(root: Path, count: int, seed: int = 0) -> Path:
    """Images of random colour blocks: distinct enough that the tiny random CLIP tells them apart."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        grid = np.random.default_rng(seed * 1000 + i).integers(0, 256, (3, 4, 3)).astype(np.uint8)
        Image.fromarray(grid).resize((64, 48), Image.NEAREST).save(root / f"{seed}-{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def block_store(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """30 distinct images plus exact byte copies of two of them (read-only)."""
    root = tmp_path_factory.mktemp("blocks")
    source = block_images(root / "images", 30)
    shutil.copy(source / "0-004.png", source / "copy-a1.png")
    shutil.copy(source / "0-004.png", source / "copy-a2.png")
    shutil.copy(source / "0-017.png", source / "copy-b1.png")
    index_folder(source, root / "store", tiny_checkpoint)
    return root / "store"


def run(*args: str) -> "object":
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_self_is_first_hit_for_ids(block_store: Path) -> None:
    searcher = Searcher.open(Store(block_store))
    table = Store(block_store).table(["id", "uri"])
    ids = table.column("id").to_numpy()
    assert not hasattr(searcher, "table")  # per-row state is compact: no item table, no uri strings
    assert searcher.store.uris_of(ids[::-1]) == table.column("uri").to_pylist()[::-1]
    distinct = [i for i, uri in zip(ids, table.column("uri").to_pylist()) if "copy" not in uri
                and not uri.endswith(("0-004.png", "0-017.png"))]
    for item_id in distinct[:10]:
        hits = searcher.search_id(int(item_id), 5)
        assert hits[0].id == item_id and hits[0].similarity == pytest.approx(1.0, abs=2e-3)
        assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert searcher.vector_of(int(ids[0])).shape == (256,)
    assert set(searcher.item(int(ids[0]))) == {"id", "uri", "source", "sha256", "width", "height"}


def test_search_by_id_lists_the_item_first_even_among_exact_copies(block_store: Path) -> None:
    from fastapi.testclient import TestClient

    from pnsfw.api.app import create_app
    from pnsfw.api.engine import Settings

    table = Store(block_store).table(["id", "uri"])
    copied = {i: u for i, u in zip(table.column("id").to_pylist(), table.column("uri").to_pylist())
              if u.endswith(("0-004.png", "copy-a1.png", "copy-a2.png"))}
    assert len(copied) == 3  # three rows with the very same vector: any could rank first at fp16 noise
    app = create_app(block_store, None, Settings(device="cpu", token=None, preload=False))
    with TestClient(app) as client:
        for item_id in copied:
            cli_hits = json.loads(run("search", "--store", block_store, "--id", item_id, "-k", "4", "--json").output)
            api_hits = client.post("/v1/search", json={"id": item_id, "k": 4}).json()["hits"]
            for hits in (cli_hits, api_hits):
                assert hits[0]["id"] == item_id and hits[0]["similarity"] == 1.0 and len(hits) == 4
                assert {h["id"] for h in hits[1:3]} == set(copied) - {item_id}  # the copies come next
                assert len({h["id"] for h in hits}) == 4
            assert [h["id"] for h in cli_hits] == [h["id"] for h in api_hits]
        assert len(client.post("/v1/search", json={"id": item_id, "k": 1}).json()["hits"]) == 1


def test_indexed_image_is_first_hit(block_store: Path) -> None:
    image = Store(block_store).table(["uri"]).column("uri")[7].as_py()
    result = run("search", "--store", block_store, "--image", image, "-k", "3", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert hits[0]["uri"] == image and hits[0]["similarity"] > 0.999


def test_text_search_returns_k_hits(block_store: Path) -> None:
    result = run("search", "--store", block_store, "--text", "a red square", "-k", "7", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert len(hits) == 7 and len({h["id"] for h in hits}) == 7
    table = run("search", "--store", block_store, "--text", "a red square", "-k", "2", "--device", "cpu")
    assert table.exit_code == 0 and len(table.output.strip().splitlines()) == 3


def test_vector_file_query(block_store: Path, tmp_path: Path) -> None:
    searcher = Searcher.open(Store(block_store))
    np.save(tmp_path / "q.npy", searcher.vector_of(5))
    result = run("search", "--store", block_store, "--vector", tmp_path / "q.npy", "-k", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["id"] == 5


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "IVF2,Flat|nprobe=2", "IVF2,PQ16x4np,RFlat"])
def test_each_kind_round_trips_through_save_and_load(block_store: Path, tmp_path: Path, kind: str) -> None:
    store_dir = shutil.copytree(block_store, tmp_path / "store")
    result = run("reindex", "--store", store_dir, "--kind", kind)
    assert result.exit_code == 0, result.output
    store = Store(store_dir)
    loaded, meta = faiss_index.load_index(store)
    assert meta["spec"] == kind and meta["space"] == store.space and meta["ntotal"] == store.rows
    assert meta["shards"] == [s.name for s in store.shards]
    plan = faiss_index.make_plan(kind, store.rows, store.dim, 1 << 30)
    built = faiss_index.create_index(store, plan)
    queries = np.ascontiguousarray(store.vectors()[1][:8], dtype=np.float32)
    expected, got = built.search(queries, 5), loaded.search(queries, 5)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_incremental_add_equals_rebuild_for_flat(tmp_path: Path, tiny_checkpoint: Path) -> None:
    first, second = block_images(tmp_path / "a", 12, seed=1), block_images(tmp_path / "b", 9, seed=2)
    store_dir = tmp_path / "store"
    index_folder(first, store_dir, tiny_checkpoint)
    index_folder(second, store_dir, tiny_checkpoint)
    store = Store(store_dir)
    incremental, meta = faiss_index.load_index(store)
    assert len(meta["shards"]) == 2 and meta["kind"] == "flat" and incremental.ntotal == 21
    rebuilt = faiss_index.create_index(store, faiss_index.make_plan("flat", store.rows, store.dim, 1 << 30))
    queries = np.ascontiguousarray(store.vectors()[1], dtype=np.float32)
    np.testing.assert_array_equal(incremental.search(queries, 21)[1], rebuilt.search(queries, 21)[1])
    assert faiss_index.update_index(store)["added"] == 0


def test_index_from_another_space_is_refused(block_store: Path, tmp_path: Path) -> None:
    store_dir = shutil.copytree(block_store, tmp_path / "store")
    meta_path = store_dir / Store(store_dir).manifest.index.folder / "index.json"
    meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), space="0123456789abcdef")))
    with pytest.raises(SpaceMismatch):
        Searcher.open(Store(store_dir))


def test_auto_picks_by_size_and_memory() -> None:
    assert faiss_index.auto_plan(50_000, 256, 16 << 30).kind == "flat"
    assert faiss_index.auto_plan(2_000_000, 256, 16 << 30).kind == "hnsw"
    refined = faiss_index.auto_plan(20_000_000, 256, 16 << 30)
    assert refined.kind == "ivfpq" and "Refine(SQfp16)" in refined.factory
    big = faiss_index.auto_plan(100_000_000, 256, 16 << 30)
    assert big.kind == "ivfpq" and "Refine" not in big.factory
    assert faiss_index.estimate_bytes(big, 100_000_000, 256) <= 16 << 30
    with pytest.raises(BadInput):
        faiss_index.auto_plan(10**11, 256, 1 << 30)


@pytest.mark.parametrize("method", ["exact", "knn"])
def test_exact_copies_land_in_one_dedup_group(block_store: Path, method: str) -> None:
    store = Store(block_store)
    found = find_groups(store, 0.999, method)
    groups, used = found.groups, found.method
    uris = store.table(["uri"]).column("uri").to_pylist()
    by_uri = dict(zip(uris, groups))
    group_a = {by_uri[u] for u in uris if u.endswith(("0-004.png", "copy-a1.png", "copy-a2.png"))}
    group_b = {by_uri[u] for u in uris if u.endswith(("0-017.png", "copy-b1.png"))}
    assert used == method and len(group_a) == 1 and len(group_b) == 1 and group_a != group_b
    assert -1 not in group_a | group_b and (groups >= 0).sum() == 5


def test_dedup_cli_writes_parquet_and_csv(block_store: Path, tmp_path: Path) -> None:
    for out in (tmp_path / "d.parquet", tmp_path / "d.csv"):
        result = run("dedup", "--store", block_store, "--threshold", "0.999", "--out", out)
        assert result.exit_code == 0, result.output
        table = pq.read_table(out) if out.suffix == ".parquet" else pcsv.read_csv(out)
        assert table.column_names == ["group", "id", "uri", "keep", "keeper", "keeper_similarity", "nearest",
                                      "similarity"] and table.num_rows == 5
        assert sorted(set(table.column("group").to_pylist())) == [0, 1]
        for group in (0, 1):  # same-size images: the lowest id is kept; the keeper's row comes first
            rows = [r for r in table.to_pylist() if r["group"] == group]
            members = {r["id"] for r in rows}
            assert rows[0]["keep"] and rows[0]["id"] == min(members) and sum(r["keep"] for r in rows) == 1
            assert all(r["keeper"] == min(members) and r["nearest"] in members - {r["id"]} for r in rows)
            assert all(r["similarity"] >= 0.998 and r["keeper_similarity"] >= 0.998 for r in rows)
    assert run("dedup", "--store", block_store, "--out", tmp_path / "d.txt").exit_code == 1


def test_dedup_and_reindex_show_progress_only_on_a_terminal(block_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(block_store, root)
    quiet = run("dedup", "--store", root, "--threshold", "0.999", "--method", "exact", "--out", tmp_path / "q.csv")
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output
    code, shown = on_a_terminal("dedup", "--store", root, "--threshold", "0.999", "--method", "exact",
                                "--out", tmp_path / "d.csv")
    assert code == 0 and "dedup (exact): 100%" in shown and "33.0/33.0" in shown and "rows/s" in shown, shown
    quiet = run("reindex", "--store", root, "--kind", "flat")
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output
    code, shown = on_a_terminal("reindex", "--store", root, "--kind", "IVF2,Flat")
    assert code == 0 and "sample: 100%" in shown and "add: 100%" in shown and "33.0/33.0" in shown, shown


def test_bad_input_gives_one_line_errors(block_store: Path, tmp_path: Path) -> None:
    searcher = Searcher.open(Store(block_store))
    with pytest.raises(NotFound):
        searcher.search_id(10**9, 3)
    for k in (0, 1001):
        with pytest.raises(BadInput):
            searcher.search_vectors(searcher.vector_of(0)[None, :], k)
    for bad in (np.zeros((1, 7)), np.zeros((1, 256)), np.full((1, 256), np.nan)):
        with pytest.raises(BadInput):
            searcher.search_vectors(bad, 3)
    huge = searcher.vector_of(4)[None, :].astype(np.float64) * 1e30  # finite in float32, its norm is not
    assert searcher.search_vectors(huge, 1)[0][0].similarity == pytest.approx(1.0, abs=2e-3)
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    np.save(tmp_path / "zero.npy", np.zeros(256, np.float32))
    cases = {("--id", "999999"): (1, "not in store"), ("--id", "1", "-k", "0"): (2, "1<=x<=1000"),
             ("--image", tmp_path / "broken.jpg"): (1, "cannot use image"), ("--id", str(2**70)): (2, "--id"),
             ("--vector", tmp_path / "zero.npy"): (1, "all zeros")}
    for args, (code, message) in cases.items():
        result = run("search", "--store", block_store, *args, "--device", "cpu")
        assert result.exit_code == code and message in result.output and "Traceback" not in result.output, args
    empty = run("search", "--store", tmp_path / "nothing", "--id", "1")
    assert empty.exit_code == 1 and "Error:" in empty.output
    with pytest.raises(StoreError):
        Searcher.open(Store(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory, labelled_store: Path) -> Path:
    from pnsfw.classifier.train import TrainOptions, train_classifier

    store_dir = shutil.copytree(labelled_store, tmp_path_factory.mktemp("trained") / "store")
    train_classifier(store_dir, "folders", TrainOptions(name="m", epochs=5))
    return store_dir


def test_explain_lists_labelled_neighbours(trained_store: Path) -> None:
    from pnsfw.classifier.model import model_paths
    from pnsfw.classifier.scorer import StoreScorer

    searcher = Searcher.open(Store(trained_store), StoreScorer.open(Store(trained_store), "m"))
    train = pq.read_table(model_paths(Store(trained_store), "m")["labels"]).to_pandas()
    train_ids = set(train.loc[train.split == "train", "id"])
    item_id = int(train.id.iloc[0])
    result = explain_vector(searcher, searcher.vector_of(item_id), 6, exclude_id=item_id)
    verdict = result["verdict"]
    assert set(verdict["probabilities"]) == {"nsfw", "sfw"} and 0.0 <= verdict["p_nsfw"] <= 1.0
    assert len(result["neighbours"]) == 6 and item_id not in {n["id"] for n in result["neighbours"]}
    for n in result["neighbours"]:
        assert n["id"] in train_ids and f"/{n['label']}/" in n["uri"] and 0.0 <= n["p_nsfw"] <= 1.0
    assert result["agree"] == sum((n["label"] == "nsfw") == verdict["nsfw"] for n in result["neighbours"])
    hits = searcher.search_id(item_id, 3)
    assert hits[0].label is not None and hits[0].p_nsfw == pytest.approx(searcher.item(item_id)["p_nsfw"])


def test_hits_score_from_vectors_while_the_bulk_scores_load_then_from_one_float32_array(trained_store: Path,
                                                                                         tmp_path: Path) -> None:
    from pnsfw.classifier.scorer import StoreScorer
    from pnsfw.classifier.scoring import lookup_scores, score_store

    store_dir = shutil.copytree(trained_store, tmp_path / "store")
    score_store(store_dir, "m")
    store = Store.open(store_dir)
    searcher = Searcher.open(store, StoreScorer.open(store, "m"))
    rows = np.array([0, 5, store.rows - 1])
    vectors = store.vectors_of(searcher.ids.ids_of(rows)).astype(np.float32)
    with searcher._scores_lock:  # as while the server's background thread reads the scores
        during = searcher.p_nsfw_of_rows(rows)
        assert searcher.stored_scores() is None
    np.testing.assert_allclose(during, searcher.scorer.p_nsfw(vectors), atol=1e-6)
    stored = searcher.stored_scores()
    assert stored is not None and stored.dtype == np.float32 and stored.shape == (store.rows,)
    bulk = lookup_scores(store, "m", searcher.ids.all_ids())
    assert not np.isnan(bulk).any()
    np.testing.assert_array_equal(stored, bulk)
    np.testing.assert_allclose(searcher.p_nsfw_of_rows(rows), during, atol=1e-6)


def test_explain_cli_by_image(trained_store: Path) -> None:
    image = Store(trained_store).table(["uri"]).column("uri")[3].as_py()
    result = run("explain", "--store", trained_store, "--model", "m", "--image", image, "-k", "4", "--json",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["k"] == 4 and {n["label"] for n in body["neighbours"]} <= {"sfw", "nsfw"}
    text = run("explain", "--store", trained_store, "--model", "m", "--id", "3", "-k", "2")
    assert text.exit_code == 0 and "nearest training examples agree" in text.output


def test_torch_exact_on_cpu_equals_the_flat_index(block_store: Path, tmp_path: Path) -> None:
    """The API's torch backend (CPU as the stand-in device, fp32) gives the flat index's hits; similarities
    agree to 1e-5 (fp16 on CUDA: ~1e-3, see pnsfw/search/exact.py)."""
    store_dir = tmp_path / "store"
    shutil.copytree(block_store, store_dir)
    assert run("reindex", "--store", store_dir, "--kind", "flat").exit_code == 0
    flat, exact = Searcher.open(Store(store_dir)), Searcher.open(Store(store_dir), exact_device="cpu")
    assert flat.backend["backend"] == "faiss" and flat.backend["kind"] == "flat"
    assert exact.backend["backend"] == "torch-exact" and exact.backend["device"] == "cpu"
    queries = np.random.default_rng(0).standard_normal((7, flat.dim)).astype(np.float32)
    queries = np.concatenate([queries, flat.vectors()[:5].astype(np.float32)])
    s_flat, i_flat = flat.search_arrays(queries, 8)
    s_exact, i_exact = exact.search_arrays(queries, 8)
    np.testing.assert_allclose(s_exact, s_flat, atol=1e-5)
    gaps = np.abs(np.diff(s_flat, axis=1)) > 1e-5  # ties (the exact copies) may come in either order
    alone = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1]], axis=1)  # no tie on either side
    assert (i_exact == i_flat)[:, :-1][alone].all()
    rows = exact.rows_of(i_exact.reshape(-1))
    truth = np.einsum("nd,nkd->nk", l2_normalize(queries), exact.vectors()[rows].astype(np.float32).reshape(
        len(queries), 8, -1))
    np.testing.assert_allclose(s_exact, truth, atol=1e-5)  # every hit is at its true similarity
    assert [[h.id for h in row] for row in exact.search_vectors(queries[:2], 3)] == i_exact[:2, :3].tolist()


def test_torch_exact_blocks_and_pads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-k merged over row blocks equals one block; k past the row count pads with -1 like FAISS."""
    from pnsfw.search import exact

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    ids = np.arange(1000, 1500)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    whole = exact.TorchExact(ids, vectors).search(queries, 20)
    monkeypatch.setattr(exact, "SCORES_BUDGET", 3 * 4 * 64)  # blocks of 64 rows
    blocked = exact.TorchExact(ids, vectors).search(queries, 20)
    np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)
    assert (blocked[1] == whole[1]).all() and whole[1].min() >= 1000
    sims, found = exact.TorchExact(ids[:4], vectors[:4]).search(queries, 6)
    assert (found[:, 4:] == -1).all() and (found[:, :4] >= 1000).all() and np.isinf(sims[:, 4:]).all()


def test_string_column_reads_rows_across_chunks() -> None:
    import pyarrow as pa

    from pnsfw.search.query import StringColumn

    column = pa.chunked_array([pa.array(["a", "bé", ""]), pa.array(["xyz", "q"])])
    assert StringColumn(column).take(np.array([4, 1, 2, 0, 3])) == ["q", "bé", "", "a", "xyz"]
    assert StringColumn(pa.array(["a", "bé", "x"]).slice(1)).take(np.array([1, 0])) == ["x", "bé"]
