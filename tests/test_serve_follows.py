"""A running `pnsfw serve` sees commits made after it started (new rows searchable), without a restart."""

import shutil
import time
from pathlib import Path

import httpx
from api_server import start_server
from conftest import class_image, index_folder


def test_serve_sees_rows_committed_after_it_started(labelled_store: Path, tiny_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    store = Path(shutil.copytree(labelled_store, tmp_path / "store"))
    server = start_server(store, tmp_path / "server.log")
    srv = next(server)
    try:
        headers = {"Authorization": f"Bearer {srv.token}"}
        before = httpx.get(f"{srv.base}/v1/stats", headers=headers, timeout=30).json()["vectors"]
        (tmp_path / "more").mkdir()
        for i in range(5):
            class_image("sfw", 500 + i).save(tmp_path / "more" / f"late{i}.jpg")
        index_folder(tmp_path / "more", store, tiny_checkpoint)
        deadline, vectors = time.monotonic() + 20, before
        while time.monotonic() < deadline and vectors != before + 5:
            time.sleep(0.3)
            vectors = httpx.get(f"{srv.base}/v1/stats", headers=headers, timeout=30).json()["vectors"]
        assert vectors == before + 5
        hits = httpx.post(f"{srv.base}/v1/search", json={"id": before + 4, "k": 3}, headers=headers, timeout=30)
        assert hits.status_code == 200, hits.text
        assert hits.json()["hits"][0]["id"] == before + 4
    finally:
        next(server, None)
