"""Hostile and rich sources through the real CLI: bad entries become error rows, bad tables fail before any
work, metadata columns arrive in the shards, defaults that suit an existing store."""

import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import class_image

from pnsfw.cli import cli
from pnsfw.store import Store


def run(store: Path, *args: str, model: "Path | None" = None) -> "CliRunner.invoke":
    extra = ["--model", str(model)] if model else []
    return CliRunner().invoke(cli, ["index", *args, "--store", str(store), *extra, "--device", "cpu",
                                    "--workers", "-1", "--no-faiss"])


def image(path: Path, i: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image("sfw", i, (40, 32)).save(path, "JPEG")
    return path


def errors_by_uri(store: Path) -> dict[str, tuple[str, str]]:
    return {r["uri"]: (r["stage"], r["reason"]) for r in Store.open(store).errors().to_pylist()}


def test_bad_entries_become_error_rows_and_the_run_goes_on(tmp_path, tiny_checkpoint):
    folder = tmp_path / "src"
    good = image(folder / "good.jpg")
    image(Path(os.fsdecode(bytes(folder) + b"/bad-\xff\xfe.jpg")), 1)  # a file name that is not UTF-8
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"http://127.0.0.1:9/a space.jpg\nhttp://[::1\nhttp:///nohost.jpg\n"
                        b"ftp://example.com/x.jpg\n" + b"rel/\xff.jpg\n" + f"file://{good}\n".encode())
    result = run(tmp_path / "store", str(folder), str(listing), model=tiny_checkpoint)
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "store")
    assert sorted(store.table(["uri"]).column("uri").to_pylist()) == [str(good), f"file://{good}"]
    errors = errors_by_uri(tmp_path / "store")
    assert errors == {
        f"{folder}/bad-\\xff\\xfe.jpg": ("list", "bad_name"),
        "http://127.0.0.1:9/a space.jpg": ("list", "bad_url"),
        "http://[::1": ("list", "bad_url"),
        "http:///nohost.jpg": ("list", "bad_url"),
        "ftp://example.com/x.jpg": ("list", "unsupported_scheme"),
        f"{tmp_path}/rel/\\xff.jpg": ("list", "bad_name"),
    }
    assert "failed: 6" in result.output
    again = run(tmp_path / "store", str(folder), str(listing), model=tiny_checkpoint)
    assert again.exit_code == 0 and "already present: 8" in again.output


@pytest.mark.parametrize("column", [pa.array([1, 2], pa.int64()), pa.array([b"a.jpg", b"b.jpg"], pa.binary())])
def test_a_uri_column_of_the_wrong_type_is_one_line_before_any_work(tmp_path, column):
    pq.write_table(pa.table({"uri": column}), tmp_path / "uris.parquet")
    result = run(tmp_path / "store", str(tmp_path / "uris.parquet"), model=tmp_path / "no-such-model.pt")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: column 'uri' of") and "not text" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
    (tmp_path / "ints.csv").write_text("uri,caption\n1,a\n2,b\n")
    csv = run(tmp_path / "store", str(tmp_path / "ints.csv"))
    assert csv.exit_code == 1 and "column 'uri' of" in csv.output and not (tmp_path / "store").exists()


def test_a_folder_without_images_says_so_and_creates_no_store(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden.jpg").write_bytes(b"x")
    result = run(tmp_path / "store", str(tmp_path / "empty"))
    assert result.exit_code == 1 and "no images in" in result.output
    assert not (tmp_path / "store").exists()


def _webdataset(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for i, members in enumerate([("jpg", "txt", "json", "cls"), ("jpg", "json"), ("png",)]):
            for ext in members:
                file = path.parent / f"{i:04d}.{ext}"
                if ext in ("jpg", "png"):
                    class_image("nsfw", i, (40, 32)).save(file)
                elif ext == "json":
                    file.write_text(json.dumps({"url": f"https://example.com/{i}.jpg", "caption": f"json {i}",
                                                "nested": {"a": 1}}))
                else:
                    file.write_text({"txt": f"caption {i}", "cls": " 3\n"}[ext])
                tar.add(file, arcname=f"part/{i:04d}.{ext}")


def test_webdataset_sidecars_and_table_columns_become_metadata(tmp_path, tiny_checkpoint):
    _webdataset(tmp_path / "wds.tar")
    a, b = image(tmp_path / "img" / "a.jpg", 1), image(tmp_path / "img" / "b.jpg", 2)
    pq.write_table(pa.table({"image_path": [str(a)], "similarity": [0.5], "tags": [["x", "y"]]}),
                   tmp_path / "list.parquet")
    pacsv.write_csv(pa.table({"link": [str(b)], "caption": ["from csv"]}), tmp_path / "list.csv")
    result = run(tmp_path / "store", str(tmp_path / "wds.tar"), str(tmp_path / "list.parquet"), model=tiny_checkpoint)
    assert result.exit_code == 0, result.output
    csv = run(tmp_path / "store", str(tmp_path / "list.csv"), "--uri-column", "link", model=tiny_checkpoint)
    assert csv.exit_code == 0, csv.output
    store = Store.open(tmp_path / "store")
    assert store.errors().num_rows == 0  # sidecars are never error rows
    shards = [pq.read_table(store.shard_source(s)).to_pylist() for s in store.shards]
    wds = {Path(r["uri"]).name: r for r in shards[0][:3]}
    first = wds["0000.jpg"]
    assert (first["key"], first["caption"], first["cls"], first["url"]) == (
        "part/0000", "caption 0", "3", "https://example.com/0.jpg")
    assert json.loads(first["json"])["nested"] == {"a": 1}
    assert wds["0001.jpg"]["caption"] == "json 1" and wds["0001.jpg"]["cls"] is None
    assert wds["0002.png"]["json"] is None and wds["0002.png"]["key"] == "part/0002"
    parquet_row = shards[0][3]
    assert parquet_row["uri"] == str(a) and parquet_row["similarity"] == "0.5"
    assert json.loads(parquet_row["tags"]) == ["x", "y"]
    assert shards[1][0]["uri"] == str(b) and shards[1][0]["caption"] == "from csv"


def test_existing_store_keeps_its_encoder_and_retries_errors(tmp_path, tiny_checkpoint):
    image(tmp_path / "src" / "a.jpg")
    (tmp_path / "src" / "b.jpg").write_bytes(b"not yet an image")
    first = run(tmp_path / "store", str(tmp_path / "src"), model=tiny_checkpoint)
    assert first.exit_code == 0 and "failed: 1" in first.output
    image(tmp_path / "src" / "b.jpg", 5)  # fixed later
    plain = run(tmp_path / "store", str(tmp_path / "src"))  # no --model: the store's own, no download
    assert plain.exit_code == 0, plain.output
    assert "indexed 0 images" in plain.output and "already present: 2" in plain.output
    retried = run(tmp_path / "store", str(tmp_path / "src"), "--retry-errors")
    assert retried.exit_code == 0, retried.output
    assert "indexed 1 images" in retried.output and "already present: 1" in retried.output
    assert sorted(Path(u).name for u in Store.open(tmp_path / "store").table(["uri"]).column("uri").to_pylist()) \
        == ["a.jpg", "b.jpg"]
