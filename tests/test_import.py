"""`pnsfw import`: clip-retrieval and Parquet layouts, resumable and idempotent, bad rows, raw 768-d stores."""

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from crash import kill_inside
from test_store_s3 import BUCKET, s3  # noqa: F401  (the SeaweedFS fixture)

from pnsfw.cli import cli
from pnsfw.store import Store

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: object, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def class_vectors(n: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two separable clusters (label 1 = nsfw) of unnormalised vectors."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    centres = np.random.default_rng(99).standard_normal((2, width)) * 3
    return (centres[labels] + rng.standard_normal((n, width))) * 7.0, labels


def write_clip_retrieval(root: Path, parts: int = 3, rows: int = 40, width: int = 512) -> tuple[Path, list[str],
                                                                                                 np.ndarray]:
    """root/img_emb/img_emb_N.npy (float16) + root/metadata/metadata_N.parquet (image_path, caption, extra)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    (root / "text_emb").mkdir()
    uris, labels = [], []
    for n in range(parts):
        x, y = class_vectors(rows, width, seed=n)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", x.astype(np.float16))
        names = [f"/data/{'nsfw' if label else 'sfw'}/{n:02d}_{i:03d}.jpg" for i, label in enumerate(y)]
        pq.write_table(pa.table({"image_path": names, "caption": [f"caption {n} {i}" for i in range(rows)],
                                 "similarity": np.linspace(0, 1, rows)}), root / "metadata" / f"metadata_{n}.parquet",
                       row_group_size=16)
        uris += names
        labels += list(y)
    return root, uris, np.array(labels)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], np.ndarray]:
    root = tmp_path_factory.mktemp("imp")
    folder, uris, labels = write_clip_retrieval(root / "laion")
    run_cli("import", folder, "--store", root / "store", "--shard-size", "50")
    return folder, root / "store", uris, labels


def snapshot(store_root: Path) -> tuple[list[tuple[int, str]], np.ndarray]:
    store = Store.open(store_root)
    table = store.table(["id", "uri"])
    return list(zip(table.column("id").to_pylist(), table.column("uri").to_pylist())), store.vectors()[1]


def test_clip_retrieval_imports_trains_scores_filters(imported, tmp_path: Path) -> None:
    folder, store_root, uris, labels = imported
    store = Store.open(store_root)
    assert store.rows == 120 and store.dim == 512 and store.projection().kind == "none"
    assert store.encoder["name"] == "ViT-B/32" and store.encoder["declared"]
    rows, vectors = snapshot(store_root)
    assert [u for _, u in rows] == uris and [i for i, _ in rows] == list(range(120))
    raw = np.concatenate([np.load(folder / "img_emb" / f"img_emb_{n}.npy") for n in range(3)]).astype(np.float32)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=2e-3)
    captions = store.table(["caption", "similarity"])
    assert captions.column("caption").to_pylist()[41] == "caption 1 1"
    assert "image_path" not in store.shard_columns()
    pa.csv.write_csv(pa.table({"uri": uris, "label": ["nsfw" if y else "sfw" for y in labels]}), tmp_path / "l.csv")
    run_cli("train", "--store", store_root, "--labels", tmp_path / "l.csv", "--epochs", "3", "--units", "16")
    run_cli("score", "--store", store_root)
    run_cli("filter", "--store", store_root, "--keep", "safe", "--columns", "caption", "--out", tmp_path / "s.csv")
    kept = pa.csv.read_csv(tmp_path / "s.csv")
    assert 0 < kept.num_rows < 120 and "caption" in kept.column_names
    truth = dict(zip(uris, labels))
    assert np.mean([truth[u] == 0 for u in kept.column("uri").to_pylist()]) > 0.9
    run_cli("search", "--store", store_root, "--id", "5", "-k", "3")
    run_cli("dedup", "--store", store_root, "--out", tmp_path / "d.parquet")
    again = run_cli("import", folder, "--store", store_root)
    assert "imported 0 embeddings" in again.output and "already present: 120" in again.output
    assert Store.open(store_root).rows == 120


def test_text_search_needs_a_loadable_model(imported, tmp_path: Path) -> None:
    _, store_root, _, _ = imported
    result = run_cli("search", "--store", store_root, "--text", "a cat", ok=False)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_bad_rows_become_error_rows(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((6, 768)).astype(np.float32)
    x[1, 3], x[4] = np.nan, 0.0
    rows = [list(map(float, v)) for v in x] + [[1.0] * 10]
    uris = [f"u{i}" for i in range(7)]
    uris[5] = None
    pq.write_table(pa.table({"url": uris, "embedding": rows}), tmp_path / "e.parquet")
    result = run_cli("import", tmp_path / "e.parquet", "--store", tmp_path / "s", "--model", "ViT-L/14")
    assert "failed: 4" in result.output
    store = Store.open(tmp_path / "s")
    assert store.rows == 3 and store.dim == 768
    errors = {r["uri"]: r["reason"] for r in store.errors().to_pylist()}
    assert errors["u1"] == "not finite" and errors["u4"] == "zero vector" and errors["u6"] == "wrong width"
    assert list(errors.values()).count("no uri") == 1
    again = run_cli("import", tmp_path / "e.parquet", "--store", tmp_path / "s")
    assert "imported 0" in again.output and Store.open(tmp_path / "s").errors().num_rows == 4
    wrong = run_cli("import", tmp_path / "e.parquet", "--store", tmp_path / "t", "--model", "ViT-B/32", ok=False)
    assert wrong.exit_code == 1 and "width 768" in wrong.output


def test_768_store_end_to_end(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Raw 768-d vectors (fixed-size binary float32 in Parquet) train, score, filter, search, dedup, serve."""
    from api_server import start_server

    x, y = class_vectors(60, 768, seed=3)
    flat = x.astype("<f4")
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(768 * 4), 60, [None, pa.py_buffer(flat.tobytes())])
    uris = [f"s3://bucket/{i}.jpg" for i in range(60)]
    pq.write_table(pa.table({"uri": uris, "vec": column, "key": [str(i) for i in range(60)]}), tmp_path / "v.parquet")
    store = tmp_path / "store"
    run_cli("import", tmp_path / "v.parquet", "--store", store, "--embedding-column", "vec")
    assert Store.open(store).dim == 768 and Store.open(store).encoder["name"] == "ViT-L/14"
    pq.write_table(pa.table({"id": list(range(60)), "label": ["nsfw" if v else "sfw" for v in y]}), tmp_path / "l.pq")
    run_cli("train", "--store", store, "--labels", tmp_path / "l.pq", "--epochs", "1", "--units", "16")
    run_cli("score", "--store", store)
    run_cli("filter", "--store", store, "--keep", "unsafe", "--out", tmp_path / "u.txt")
    run_cli("dedup", "--store", store, "--out", tmp_path / "d.parquet")
    run_cli("export", "--store", store, "--raw", "--out", tmp_path / "r.onnx")
    for server in start_server(store, tmp_path / "serve.log"):
        with server.client() as client:
            body = client.post("/v1/search", json={"id": 4, "k": 3}).json()
            assert body["hits"][0]["id"] == 4 and body["hits"][0]["p_nsfw"] is not None


@pytest.mark.parametrize("step,nth,least", [("staged:shards", 2, 0), ("committed:_manifest", 2, 1)])
def test_kill_mid_import_then_rerun_equals_an_uninterrupted_import(imported, tmp_path: Path, step: str, nth: int,
                                                                   least: int) -> None:
    """kill -9 while a shard is staged (later ones may be staging too), or right after the first shard's commit
    (manifest #1 is the space): the rerun gives the rows and ids of an uninterrupted import."""
    folder, reference, _, _ = imported
    store = tmp_path / "store"
    kill_inside(step, nth, ["import", folder, "--store", store, "--shard-size", "50", "--no-faiss"],
                tmp_path / "marker")
    assert least <= Store.open(store).rows < 120
    run_cli("import", folder, "--store", store, "--shard-size", "50")
    got, want = snapshot(store), snapshot(reference)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert {p.name for p in (store / "shards").iterdir()} == {s.name for s in Store.open(store).shards}


def test_file_url_imports_like_a_path(imported, tmp_path: Path) -> None:
    folder, reference, _, _ = imported
    run_cli("import", f"file://{folder}", "--store", tmp_path / "store", "--shard-size", "50", "--no-faiss")
    got, want = snapshot(tmp_path / "store"), snapshot(reference)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.usefixtures("s3")
def test_s3_sources_stream_into_local_and_s3_stores(imported, tmp_path: Path) -> None:
    """clip-retrieval and Parquet layouts read from a real S3 server (SeaweedFS) equal the local import."""
    import s3fs

    folder, reference, _, _ = imported
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    prefix = f"{BUCKET}/laion-{uuid.uuid4().hex[:8]}"
    fs.put(str(folder), prefix, recursive=True)
    run_cli("import", f"s3://{prefix}", "--store", tmp_path / "store", "--shard-size", "50", "--no-faiss")
    got, want = snapshot(tmp_path / "store"), snapshot(reference)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    sources = set(Store.open(tmp_path / "store").table(["source"]).column("source").to_pylist())
    assert sources == {f"s3://{prefix}/img_emb/img_emb_{n}.npy" for n in range(3)}
    again = run_cli("import", f"s3://{prefix}", "--store", tmp_path / "store", "--no-faiss")
    assert "imported 0 embeddings" in again.output

    x, _ = class_vectors(30, 768, seed=5)
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(30)], "embedding": [list(v) for v in x]}),
                   tmp_path / "v.parquet", row_group_size=8)
    fs.put(str(tmp_path / "v.parquet"), f"{prefix}-pq/part-0.parquet")
    store_url = f"s3://{prefix}-store"
    result = run_cli("import", f"s3://{prefix}-pq", "--store", store_url, "--model", "ViT-L/14", "--no-faiss")
    assert "imported 30 embeddings" in result.output
    store = Store.open(store_url)
    assert store.rows == 30 and store.dim == 768
    np.testing.assert_allclose(store.vectors()[1], x / np.linalg.norm(x, axis=1, keepdims=True), atol=2e-3)


def test_uri_hash_is_blake2b_of_the_utf8() -> None:
    """uri_hash is the little-endian 8-byte blake2b of the uri's UTF-8 for every input kind (list, Arrow array,
    sliced array, lengths around blake2b's 128-byte blocks), and keeps the value existing stores hold."""
    import hashlib
    import random

    from pnsfw.store.shards import uri_hash

    rng = random.Random(0)
    uris = ["", "a", "é/ü?q=1"] + ["".join(rng.choice("ab/é?&=") for _ in range(n)) for n in
                                   [*range(120, 140), 255, 256, 257, 1000] * 20]
    want = [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uris]
    assert uri_hash(pa.array(uris)).tolist() == want and uri_hash(uris).tolist() == want
    assert uri_hash(pa.array(uris).slice(5)).tolist() == want[5:] and uri_hash(uris[:3]).tolist() == want[:3]
    chunked = pa.chunked_array([pa.array(uris[:7]), pa.array(uris[7:])])
    assert uri_hash(chunked).tolist() == want
    assert uri_hash(["https://example.com/images/000000001.jpg"]).tolist() == [607156370087544967]
    with pytest.raises(ValueError):
        uri_hash(pa.array(["a", None]))


def test_uri_hash_lanes_equal_hashlib() -> None:
    """Columns large enough for urihash's numpy lanes (groups of >= MIN_LANES uris of one block count, a group
    of more than LANES split in parts) give hashlib's values: random unicode uris of 0-259 characters (1-8
    blocks, lengths at the block edges), uniform short ones, every offset width, slices and chunks."""
    import hashlib
    import random

    from pnsfw.store import urihash
    from pnsfw.store.shards import uri_hash, uri_hash_one

    rng = random.Random(1)
    alphabet = "abcXYZ019/:.?&=%-_é€漢𝄞"
    uris = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 260))) for _ in range(5000)]
    uris += ["x" * n for n in (0, 1, 127, 128, 129, 255, 256, 257)] * 3
    uris += [f"https://example.com/images/{i:09d}.jpg" for i in range(urihash.LANES + 500)]
    rng.shuffle(uris)
    want = [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uris]
    lengths = [len(u.encode()) for u in uris]
    assert max(lengths) > 3 * urihash.BLOCK and sum(1 < -(-n // 128) for n in lengths) >= urihash.MIN_LANES
    for kind in (pa.string(), pa.large_string(), pa.binary(), pa.string_view()):
        assert uri_hash(pa.array(uris).cast(kind), lanes=True).tolist() == want, kind
    assert uri_hash(pa.array(uris).slice(1001, 7000), lanes=True).tolist() == want[1001:8001]
    chunked = pa.chunked_array([pa.array(uris[:2500]), pa.array(uris[2500:])])
    assert uri_hash(chunked, lanes=True).tolist() == want == uri_hash(chunked, lanes=False).tolist()
    assert uri_hash(uris[:2000]).tolist() == want[:2000]
    assert [uri_hash_one(u) for u in uris[:50]] == want[:50]


def test_import_with_hash_lanes_on_mapper_threads(tmp_path: Path) -> None:
    """Several mappers hashing in numpy lanes (the default on >= 6 cores) store hashlib's uri_hash, in order,
    and a second run adds nothing (its rows are found by those hashes' sources' offsets)."""
    import hashlib

    from pnsfw.indexer.importer import ImportOptions, run_import

    folder, uris, _ = write_clip_retrieval(tmp_path / "laion", parts=2, rows=2500, width=16)
    options = ImportOptions(model="tiny-declared", shard_size=2000, map_threads=3, hash_lanes=True)
    assert run_import([str(folder)], tmp_path / "store", options).imported == 5000
    table = Store.open(tmp_path / "store").table(["id", "uri", "uri_hash"])
    assert table.column("uri").to_pylist() == uris and table.column("id").to_pylist() == list(range(5000))
    want = [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uris]
    assert table.column("uri_hash").to_pylist() == want
    assert run_import([str(folder)], tmp_path / "store", options).imported == 0


def test_text_search_with_the_declared_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Embeddings imported with --model CHECKPOINT get its real fingerprint: `search --text` loads that CLIP's
    text tower and returns the items nearest to the text embedding."""
    from pnsfw.indexer.embedding import EmbeddingService

    x, _ = class_vectors(40, 512, seed=7)
    pq.write_table(pa.table({"uri": [f"u{i}" for i in range(40)], "embedding": [list(v) for v in x]}),
                   tmp_path / "v.parquet")
    run_cli("import", tmp_path / "v.parquet", "--store", tmp_path / "s", "--model", tiny_checkpoint)
    result = run_cli("search", "--store", tmp_path / "s", "--text", "a cat", "-k", "3", "--json")
    hits = json.loads(result.output)
    text = EmbeddingService.open(Store.open(tmp_path / "s"), device="cpu").embed_texts(["a cat"])[0]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert [h["uri"] for h in hits] == [f"u{i}" for i in np.argsort(-(unit @ text))[:3]]


def test_import_of_unit_length_rows_does_not_import_torch(tmp_path: Path) -> None:
    """clip-retrieval's unit-length fp16 rows are checked in numpy: `import --no-faiss` never loads torch (its
    ~2.5-5 s import was most of a cold import); rows to rescale still import it."""
    from test_weights_only import pnsfw

    folder = tmp_path / "laion"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    x = np.random.default_rng(3).standard_normal((300, 512))
    np.save(folder / "img_emb" / "img_emb_0.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    pq.write_table(pa.table({"url": [f"https://e.com/{i}.jpg" for i in range(300)]}),
                   folder / "metadata" / "metadata_0.parquet")
    done, imported = pnsfw("import", folder, "--store", tmp_path / "store", "--no-faiss")
    assert "imported 300 embeddings" in done.stdout and "torch" not in imported
    np.save(folder / "img_emb" / "img_emb_0.npy", (x * 3).astype(np.float16))
    done, imported = pnsfw("import", folder, "--store", tmp_path / "other", "--no-faiss")
    assert "imported 300 embeddings" in done.stdout and "torch" in imported


def test_numpy_half_checks_equal_torch() -> None:
    """unit_rows' numpy checks of fp16 rows give torch's codes and rows: zero, subnormal-only, inf, NaN, huge
    finite rows, unit rows kept bit for bit, a block to rescale; 512 and 768 wide."""
    from pnsfw.indexer import unitvec

    for width in (512, 768):
        x = np.random.default_rng(width).standard_normal((3000, width))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        x[5], x[11], x[13] = 0, 0, 60000.0
        x[7, 3], x[9, 1], x[11, 0] = np.inf, np.nan, 6e-8
        for rows in (x, np.concatenate([x[:2000], x[2000:] * 3])):
            codes, out = unitvec.unit_rows(rows.copy())
            reference = np.zeros(len(rows), np.int8)
            expected = unitvec._torch_rows(rows.copy(), reference, range(0, len(rows), unitvec.BLOCK))
            assert codes.tolist() == reference.tolist() and sorted(np.nonzero(codes)[0]) == [5, 7, 9]
            assert np.array_equal(out.view(np.uint16), expected.view(np.uint16))
