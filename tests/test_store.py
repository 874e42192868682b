"""The store on its own: commits, orphans, the lock, projections, sizes, readability without pnsfw."""

import numpy as np
import pyarrow as pa
import pytest

from pnsfw.errors import BadInput, SpaceMismatch, StoreError, StoreLocked
from pnsfw.indexer.projection import make_projection, pca_projection, random_projection
from pnsfw.store import Projection, Store
from pnsfw.store.lock import WriteLock
from pnsfw.store.shards import ERROR_SCHEMA, embedding_array
from pnsfw.store.sizes import parse_duration, parse_size

ENCODER = {"name": "test", "fingerprint": "f" * 64, "resolution": 32, "width": 512}


def _rows(writer, n: int, dim: int = 256) -> pa.Table:
    ids = writer.next_ids(n)
    vectors = np.random.default_rng(len(ids)).standard_normal((n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    return pa.table({"id": ids, "uri": [f"u{i}" for i in ids], "source": ["s"] * n, "sha256": ["x"] * n,
                     "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
                     "embedding": embedding_array(vectors)})


def test_commit_lists_shards_and_ids_continue(tmp_path):
    store = Store(tmp_path / "s")
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        writer.commit(_rows(writer, 5), None)
        writer.commit(_rows(writer, 3), pa.table({"uri": ["bad"], "source": ["s"], "stage": ["decode"],
                                                  "reason": ["corrupt"], "detail": [""]}, schema=ERROR_SCHEMA))
    reopened = Store.open(tmp_path / "s")
    assert reopened.rows == 8
    assert reopened.vectors()[0].tolist() == list(range(8))
    assert reopened.errors().column("reason").to_pylist() == ["corrupt"]
    known = reopened.known_uris()
    assert all(u in known for u in [f"u{i}" for i in range(8)] + ["bad"]) and len(known) == 9
    assert "u8" not in known and "" not in known


def test_unlisted_files_are_not_part_of_the_store_and_only_dead_ones_are_cleaned(tmp_path):
    import os
    import subprocess
    import sys

    from pnsfw.store.store import writer_token

    store = Store(tmp_path / "s")
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        writer.commit(_rows(writer, 4), None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    shards = tmp_path / "s" / "shards"
    orphan = shards / f"part-00001-{writer_token().replace(str(os.getpid()), dead)}.parquet"
    tmp = shards / f".part-00002-x.parquet.tmp-{dead}"
    live = shards / f"part-00001-{writer_token()}.parquet"  # a live writer (this process) is about to commit it
    unknown = shards / "part-00009.parquet"  # no writer token and young: cannot be proven dead
    for path in (orphan, tmp, live, unknown):
        path.write_bytes(b"half-written shard of a crashed run")
    assert Store.open(tmp_path / "s").rows == 4
    with Store(tmp_path / "s").writer():
        pass
    assert not orphan.exists() and not tmp.exists()
    assert live.exists() and unknown.exists()
    assert Store.open(tmp_path / "s").rows == 4


def test_second_writer_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    with WriteLock(tmp_path / "s"):
        with pytest.raises(StoreLocked, match="being written by another process"):
            WriteLock(tmp_path / "s").acquire()
    WriteLock(tmp_path / "s").acquire().release()


def test_missing_store_and_bad_manifest_are_clear(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        Store.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot read"):
        Store.open(tmp_path / "bad")


def test_other_encoder_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    with store.writer() as writer:
        writer.set_space(ENCODER, random_projection(512))
        with pytest.raises(SpaceMismatch, match="built with CLIP model"):
            writer.set_space(dict(ENCODER, fingerprint="0" * 64), random_projection(512))


def test_random_projection_is_seeded_orthogonal_and_unit():
    a, b = random_projection(512, seed=3), random_projection(512, seed=3)
    assert a.fingerprint == b.fingerprint != random_projection(512, seed=4).fingerprint
    np.testing.assert_allclose(a.matrix.T @ a.matrix, np.eye(256), atol=1e-5)
    out = a.apply(np.random.default_rng(0).standard_normal((10, 512)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_pca_and_file_projections_round_trip(tmp_path):
    sample = np.random.default_rng(0).standard_normal((300, 512)) @ np.diag(np.linspace(3, 0.1, 512))
    pca = pca_projection(sample)
    assert pca.kind == "pca" and pca.dim == 256 and np.abs(pca.bias).sum() > 0
    pca.save(tmp_path / "p.npy")
    loaded = make_projection(str(tmp_path / "p.npy"), 512)
    assert loaded.fingerprint == pca.fingerprint
    with pytest.raises(BadInput, match="width"):
        make_projection(str(tmp_path / "p.npy"), 768)
    with pytest.raises(BadInput, match=r"random, pca, none or a \.npy"):
        make_projection("nonsense", 512)
    assert Projection.from_array(random_projection(512).packed(), "file").width == 512


@pytest.mark.parametrize("text,value", [("16G", 16 * 10**9), ("512Mi", 512 * 2**20), ("50k", 50_000),
                                        ("1.5k", 1500), ("100", 100), ("2GB", 2 * 10**9)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_and_duration_errors():
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        parse_size("3X")
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("2") == 2


def test_shards_are_readable_without_pnsfw(labelled_store):
    """The README recipe: pyarrow and duckdb read shards; the embedding decodes with numpy."""
    import duckdb
    import pyarrow.parquet as pq

    path = sorted((labelled_store / "shards").glob("*.parquet"))[0]
    table = pq.read_table(path)  # the README's recipe, line for line
    meta = table.schema.field("embedding").metadata
    col = table.column("embedding").combine_chunks()
    vectors = np.frombuffer(col.buffers()[1], dtype="<f2").reshape(-1, int(meta[b"dim"]))
    dim = int(meta[b"dim"])
    assert meta[b"dtype"] == b"float16" and vectors.shape == (table.num_rows, 256)
    vectors = vectors.astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    count, width = duckdb.sql(f"SELECT count(*), max(octet_length(embedding)) FROM '{path}'").fetchall()[0]
    assert count == table.num_rows and width == dim * 2
