"""A running `pnsfw serve` sees commits made after it started (new rows searchable, labels kept), without a
restart."""

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from api_server import start_server
from conftest import class_image, index_folder


def wait_for(check: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.3)
    return check()


def test_serve_sees_rows_and_labels_committed_after_it_started(labelled_store: Path, tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    store = Path(shutil.copytree(labelled_store, tmp_path / "store"))
    server = start_server(store, tmp_path / "server.log")
    srv = next(server)
    try:
        client = httpx.Client(base_url=srv.base, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30)

        def stats() -> dict:
            return client.get("/v1/stats").json()

        def first_hit(item_id: int) -> dict:
            response = client.post("/v1/search", json={"id": item_id, "k": 3})
            assert response.status_code == 200, response.text
            return response.json()["hits"][0]

        before = stats()
        saved = client.post("/v1/labels", json={"id": 7, "label": "checked", "by": "ann"})
        assert saved.status_code == 200, saved.text
        assert first_hit(7)["label"] == "checked"  # at once, before the server follows the labels commit
        assert wait_for(lambda: stats()["version"] >= saved.json()["version"])
        time.sleep(1.5)  # a follow cycle past the labels commit
        assert first_hit(7)["label"] == "checked"

        (tmp_path / "more").mkdir()
        for i in range(5):
            class_image("sfw", 500 + i).save(tmp_path / "more" / f"late{i}.jpg")
        index_folder(tmp_path / "more", store, tiny_checkpoint)  # new rows: a fresh searcher is swapped in
        assert wait_for(lambda: stats()["vectors"] == before["vectors"] + 5)
        assert first_hit(before["vectors"] + 4)["id"] == before["vectors"] + 4
        assert first_hit(7)["label"] == "checked"  # people's labels survive the swap
        assert client.post("/v1/labels", json={"id": before["vectors"] + 4, "label": "late"}).status_code == 200
        assert first_hit(before["vectors"] + 4)["label"] == "late"
        client.close()
    finally:
        next(server, None)
