"""Thumbnails and the review/label endpoints against a real `pnsfw serve` (tests/api_server.py)."""

import io

from api_server import Server
from PIL import Image

from pnsfw.api.thumbs import ThumbCache, make_thumb


def test_thumb_is_a_small_jpeg_behind_the_token(api_server: Server) -> None:
    with api_server.client() as client:
        uri = client.get("/v1/items/3").json()["uri"]
        original = Image.open(uri)
        response = client.get("/v1/items/3/thumb")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.content))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
        assert thumb.size[0] / thumb.size[1] == original.size[0] / original.size[1]
        assert client.get("/v1/items/3/thumb").content == response.content  # from the cache
        assert client.get("/v1/items/999999/thumb").status_code == 404
        assert client.get("/v1/items/-1/thumb").status_code == 422
    with api_server.client(token=None) as anonymous:
        assert anonymous.get("/v1/items/3/thumb").status_code == 401


def test_thumb_of_a_large_image_fits_256_px() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (1200, 600), (10, 200, 30, 128)).save(buffer, format="PNG")
    thumb = Image.open(io.BytesIO(make_thumb(buffer.getvalue())))
    assert thumb.size == (256, 128) and thumb.mode == "RGB"


def test_thumb_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = ThumbCache(max_bytes=250)
    for i in range(3):
        cache.put((i, "u"), bytes(100))
    assert len(cache) == 2 and cache.get((0, "u")) is None and cache.bytes == 200
    cache.get((1, "u"))
    cache.put((3, "u"), bytes(100))
    assert cache.get((2, "u")) is None and cache.get((1, "u")) is not None


def test_labels_are_validated_saved_and_taken_back(api_server: Server) -> None:
    with api_server.client() as client:
        try:
            assert client.post("/v1/labels", json={"id": 1, "label": "porn"}).status_code == 422  # not a class
            assert client.post("/v1/labels", json={"id": 999999, "label": "sfw"}).status_code == 404
            assert client.post("/v1/labels", json={"id": 1}).status_code == 422
            assert client.post("/v1/labels", content=b"nope", headers={"content-type": "application/json"}
                               ).status_code == 422
            saved = client.post("/v1/labels", json={"id": 1, "label": "nsfw"})
            assert saved.status_code == 200 and saved.json()["saved"] == 1
            both = client.post("/v1/labels", json=[{"id": 2, "label": "sfw"}, {"id": 1, "label": "sfw"}]).json()
            assert (both["saved"], both["labels"]) == (2, 2) and both["version"] > saved.json()["version"]
            listed = client.get("/v1/labels").json()
            assert listed["count"] == 2 and sorted(listed["classes"]) == ["nsfw", "sfw"]
            assert {(r["id"], r["label"], r["source"]) for r in listed["labels"]} == {(1, "sfw", "review"),
                                                                                      (2, "sfw", "review")}
            assert client.get("/v1/items/1").json()["label"] == "sfw"  # a person's label wins on items and hits
            queue = client.get("/v1/review", params={"n": 200}).json()
            ids = [item["id"] for item in queue["items"]]
            assert 1 not in ids and 2 not in ids and queue["labelled"] == 2
            assert client.delete("/v1/labels/1").status_code == 200
            assert [r["id"] for r in client.get("/v1/labels").json()["labels"]] == [2]
        finally:
            client.delete("/v1/labels/1")
            client.delete("/v1/labels/2")
    with api_server.client(token=None) as anonymous:
        assert anonymous.get("/v1/labels").status_code == 401
        assert anonymous.post("/v1/labels", json={"id": 1, "label": "sfw"}).status_code == 401
        assert anonymous.get("/v1/review").status_code == 401


def test_review_queue_is_ranked_and_described(api_server: Server) -> None:
    with api_server.client() as client:
        queue = client.get("/v1/review", params={"n": 10}).json()
        assert client.get("/v1/review", params={"n": 0}).status_code == 422
        assert client.get("/v1/review", params={"model": "nope"}).status_code == 404
    assert queue["model"] == "default" and len(queue["items"]) == 10 and queue["remaining"] >= 80
    priorities = [item["priority"] for item in queue["items"]]
    assert priorities == sorted(priorities, reverse=True)
    first = queue["items"][0]
    assert first["thumb"] == f"/v1/items/{first['id']}/thumb" and first["uri"]
    assert set(first["verdict"]) >= {"p_nsfw", "threshold", "nsfw", "label", "probabilities"}
    assert first["agreement"]["k"] == 10 and 0 <= first["agreement"]["agree"] <= 10
    assert "sha256" in first["metadata"] and isinstance(first["reasons"], list)


def test_label_command_saves_checks_and_imports(tmp_path, labelled_store) -> None:
    import shutil
    import subprocess
    import sys

    from api_server import REPO

    from pnsfw.classifier.reviewed import current_rows
    from pnsfw.store import Store

    store = tmp_path / "store"
    shutil.copytree(labelled_store, store)

    def label(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pnsfw.cli", "label", "--store", str(store), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    done = label("--id", "4", "--id", "5", "--label", "nsfw", "--classes", "sfw,nsfw")
    assert done.returncode == 0, done.stderr
    assert "saved 2 labels" in done.stdout
    wrong = label("--id", "4", "--label", "porn", "--classes", "sfw,nsfw")
    assert wrong.returncode == 1 and "not one of the classes sfw, nsfw" in wrong.stderr
    missing = label("--id", "999999", "--label", "sfw")
    assert missing.returncode == 1 and "id 999999 is not in store" in missing.stderr
    assert label("--label", "sfw").returncode == 1
    uri = Store.open(store).table(["uri"]).column("uri")[6].as_py()
    (tmp_path / "fix.csv").write_text(f"uri,label\n{uri},sfw\n/not/there.jpg,sfw\n")
    imported = label("--file", str(tmp_path / "fix.csv"))
    assert imported.returncode == 0, imported.stderr
    assert "skipped 1 labels" in imported.stderr
    rows = current_rows(Store.open(store))
    assert {i: (r["label"], r["source"]) for i, r in rows.items()} == {4: ("nsfw", "cli"), 5: ("nsfw", "cli"),
                                                                       6: ("sfw", "file")}
