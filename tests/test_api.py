"""The HTTP API through a real uvicorn process: every endpoint, every error code, the token guard, a burst."""

import concurrent.futures
import io
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_server import TOKEN, Server

from pnsfw.store import Store


def stored(server: Server) -> tuple[list[int], list[str], np.ndarray]:
    """Ids, uris and vectors of the served store, read directly (not through the API)."""
    store = Store.open(server.store)
    table = store.table(["id", "uri"])
    ids, vectors = store.vectors()
    order = {int(i): n for n, i in enumerate(ids)}
    rows = [order[int(i)] for i in table.column("id").to_pylist()]
    return table.column("id").to_pylist(), table.column("uri").to_pylist(), vectors[rows].astype(np.float32)


def classifier(server: Server):
    from pnsfw.classifier.model import load_classifier

    return load_classifier(Store.open(server.store), "default")


def uri_of(server: Server, label: str) -> tuple[int, str]:
    ids, uris, _ = stored(server)
    return next((i, u) for i, u in zip(ids, uris) if f"/{label}/" in u and "::" not in u)


def test_health_is_public_and_the_rest_needs_the_token(api_server: Server) -> None:
    with api_server.client(token=None) as anonymous:
        health = anonymous.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["vectors"] == 83 and health.json()["model"] == "default"
        for path in ("/v1/stats", "/metrics", "/v1/items/0", "/v1/items/0/image"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/v1/search", json={"text": "x"}).status_code == 401
        assert anonymous.get("/").status_code == 200  # the page itself holds no data; its calls send the token
    with api_server.client(token=TOKEN + "x") as wrong:
        assert wrong.get("/v1/stats").status_code == 401
    with api_server.client(token=None) as raw:
        assert raw.get("/v1/stats", headers={"Authorization": TOKEN}).status_code == 401  # scheme missing
        assert raw.get("/v1/stats", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    with api_server.client() as client:
        stats = client.get("/v1/stats").json()
    assert stats["vectors"] == 83 and stats["dim"] == 256 and stats["model"]["classes"] == ["nsfw", "sfw"]
    assert stats["index"]["ntotal"] >= 80 and stats["settings"]["token_required"] is True


def test_binds_loopback_and_serves_openapi(api_server: Server) -> None:
    assert api_server.base.startswith("http://127.0.0.1:")
    with api_server.client(token=None) as client:
        spec = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    for path in ("/health", "/v1/stats", "/v1/score", "/v1/search", "/v1/explain", "/v1/items/{item_id}",
                 "/v1/items/{item_id}/image"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}


def test_score_embedding_matches_the_classifier(api_server: Server) -> None:
    _ids, _, vectors = stored(api_server)
    expected = classifier(api_server).p_nsfw(vectors[:5])
    with api_server.client() as client:
        for vector, p in zip(vectors[:5], expected):
            verdict = client.post("/v1/score", json={"embedding": vector.tolist()}).json()
            assert verdict["p_nsfw"] == pytest.approx(float(p), abs=1e-5)
            assert verdict["nsfw"] == (verdict["p_nsfw"] >= verdict["threshold"])
            assert sum(verdict["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_json_embeddings_are_normalised(api_server: Server) -> None:
    _, _, vectors = stored(api_server)
    with api_server.client() as client:
        for scale in (1.0, 1e-20, 1e30):  # the direction is what counts: huge values once gave similarity 0
            body = {"embedding": (vectors[5].astype(np.float64) * scale).tolist(), "k": 1}
            search = client.post("/v1/search", json=body).json()
            score = client.post("/v1/score", json={"embedding": body["embedding"]}).json()
            assert search["hits"][0]["similarity"] == pytest.approx(1.0, abs=2e-3), scale
            assert score["p_nsfw"] == pytest.approx(search["verdict"]["p_nsfw"], abs=1e-6)
            assert score["p_nsfw"] == pytest.approx(float(classifier(api_server).p_nsfw(vectors[5:6])[0]), abs=1e-4)


def test_upload_score_and_search_find_the_image_itself(api_server: Server) -> None:
    item_id, uri = uri_of(api_server, "nsfw")
    data = Path(uri).read_bytes()
    with api_server.client() as client:
        verdict = client.post("/v1/score", files={"image": ("x.jpg", data, "image/jpeg")}).json()
        result = client.post("/v1/search", files={"image": ("x.jpg", data, "image/jpeg")}, data={"k": "5"}).json()
        item = client.get(f"/v1/items/{item_id}").json()
    assert result["query"]["kind"] == "image" and result["k"] == 5 and len(result["hits"]) == 5
    top = result["hits"][0]
    assert top["id"] == item_id and top["uri"] == uri and top["similarity"] > 0.99
    assert top["label"] == "nsfw" and top["p_nsfw"] == pytest.approx(verdict["p_nsfw"], abs=1e-2)
    assert result["verdict"]["p_nsfw"] == pytest.approx(verdict["p_nsfw"], abs=1e-6)
    sims = [h["similarity"] for h in result["hits"]]
    assert sims == sorted(sims, reverse=True)
    assert item["verdict"]["p_nsfw"] == pytest.approx(verdict["p_nsfw"], abs=1e-2)


def test_search_by_text_id_and_embedding(api_server: Server) -> None:
    ids, uris, vectors = stored(api_server)
    with api_server.client() as client:
        text = client.post("/v1/search", json={"text": "a red bird", "k": 4}).json()
        by_id = client.post("/v1/search", json={"id": ids[3], "k": 6}).json()
        by_vector = client.post("/v1/search", json={"embedding": vectors[3].tolist(), "k": 2}).json()
        everything = client.post("/v1/search", json={"id": ids[0], "k": 1000}).json()
    assert text["query"] == {"kind": "text", "text": "a red bird"} and len(text["hits"]) == 4
    assert text["verdict"] is None  # the classifier scores image vectors, not text
    assert len(by_id["hits"]) == 6 and by_id["hits"][0]["id"] == ids[3] and by_id["hits"][0]["similarity"] == 1.0
    assert by_vector["hits"][0]["id"] == ids[3] and by_vector["hits"][0]["similarity"] > 0.999
    assert by_id["hits"][1]["id"] == by_vector["hits"][1]["id"]
    assert len(everything["hits"]) == len(ids) and everything["hits"][0]["id"] == ids[0]  # k above the store size
    assert {h["uri"] for h in everything["hits"]} == set(uris)


def test_explain_by_id_and_upload(api_server: Server) -> None:
    item_id, uri = uri_of(api_server, "sfw")
    with api_server.client() as client:
        by_id = client.post("/v1/explain", json={"id": item_id, "k": 5}).json()
        upload = client.post("/v1/explain", files={"image": ("a.jpg", Path(uri).read_bytes())}, data={"k": "3"}).json()
    assert by_id["query"] == {"kind": "id", "id": item_id} and by_id["k"] == 5
    assert item_id not in [n["id"] for n in by_id["neighbours"]]
    assert by_id["agree"] == sum(n["agrees"] for n in by_id["neighbours"])
    assert all(n["label"] in ("sfw", "nsfw") for n in by_id["neighbours"])
    assert upload["query"]["kind"] == "image" and len(upload["neighbours"]) == 3


def test_item_metadata_and_stored_image_bytes(api_server: Server) -> None:
    ids, uris, _ = stored(api_server)
    with api_server.client() as client:
        for item_id, uri in [*[(i, u) for i, u in zip(ids, uris) if "::" in u][:1], (ids[0], uris[0])]:
            meta = client.get(f"/v1/items/{item_id}").json()
            assert meta["id"] == item_id and meta["uri"] == uri and meta["verdict"]["model"] == "default"
            image = client.get(f"/v1/items/{item_id}/image")
            assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
            if "::" in uri:  # a tar member: the bytes are read out of the tar
                from PIL import Image

                assert Image.open(io.BytesIO(image.content)).size == (64, 48)
            else:
                assert image.content == Path(uri).read_bytes()


def test_remote_uris_are_not_fetched() -> None:
    from pnsfw.api.images import read_store_image
    from pnsfw.errors import NotFound

    with pytest.raises(NotFound, match="remote"):
        read_store_image("http://127.0.0.1:9/secret.jpg")


BAD_REQUESTS = [
    (415, "post", "/v1/score", {"files": {"image": ("a.txt", b"hello, not an image", "text/plain")}}),
    (415, "post", "/v1/search", {"files": {"image": ("a.jpg", b"\xff\xd8\xff\xe0 truncated", "image/jpeg")}}),
    (415, "post", "/v1/search", {"content": b"text=cat", "headers": {"content-type": "text/plain"}}),
    (404, "get", "/v1/items/999999", {}),
    (404, "get", "/v1/items/999999/image", {}),
    (404, "post", "/v1/search", {"json": {"id": 999999}}),
    (404, "post", "/v1/explain", {"json": {"id": 999999}}),
    (404, "post", "/v1/score", {"json": {"embedding": [0.1] * 256}, "path": "/v1/nothing"}),
    (422, "post", "/v1/search", {"json": {"text": "cat", "k": 0}}),
    (422, "post", "/v1/search", {"json": {"text": "cat", "k": 1001}}),
    (422, "post", "/v1/search", {"json": {"text": "cat", "id": 3}}),
    (422, "post", "/v1/search", {"json": {}}),
    (422, "post", "/v1/search", {"json": {"text": "cat", "colour": "red"}}),
    (422, "post", "/v1/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    (422, "post", "/v1/search", {"files": {"photo": ("a.jpg", b"x")}}),
    (422, "post", "/v1/search", {"files": {"image": ("a.jpg", b"x")}, "data": {"k": "many"}}),
    (422, "post", "/v1/search", {"files": {"image": ("a.jpg", b"x")}, "data": {"k": "0"}}),
    (422, "post", "/v1/score", {"json": {"embedding": [0.1, 0.2]}}),
    (422, "post", "/v1/score", {"content": b'{"embedding": [NaN]}', "headers": {"content-type": "application/json"}}),
    (422, "post", "/v1/explain", {"json": {"id": "three"}}),
    (422, "get", "/v1/items/abc", {}),
    (422, "get", "/v1/items/-1", {}),
    (422, "get", f"/v1/items/{2**70}", {}),  # beyond int64: once a 500
    (422, "get", f"/v1/items/{2**70}/image", {}),
    (422, "get", f"/v1/items/{2**70}/thumb", {}),
    (422, "get", "/v1/items/1.5", {}),
    (422, "post", "/v1/search", {"json": {"id": 2**70}}),
    (422, "post", "/v1/explain", {"json": {"id": 2**70}}),
    (422, "post", "/v1/search", {"json": {"id": True}}),  # once searched id 1
    (422, "post", "/v1/explain", {"json": {"id": True}}),
    (422, "post", "/v1/search", {"json": {"id": 1.5}}),
    (422, "post", "/v1/search", {"json": {"id": "1"}}),
    (422, "post", "/v1/search", {"json": {"id": -1}}),
    (422, "post", "/v1/search", {"json": {"id": 1, "k": 2.0}}),
    (422, "post", "/v1/score", {"json": {"embedding": [0.0] * 256}}),  # no direction
    (422, "post", "/v1/search", {"json": {"embedding": [0] * 256, "k": 3}}),
    (422, "post", "/v1/score", {"json": {"embedding": [True] * 256}}),
    (422, "post", "/v1/score", {"content": b'{"embedding": [' + b", ".join([b"1e39"] * 256) + b"]}",
                                "headers": {"content-type": "application/json"}}),  # beyond float32
]


@pytest.mark.parametrize("status,method,path,kwargs", BAD_REQUESTS)
def test_bad_input_gets_a_json_4xx(api_server: Server, status: int, method: str, path: str, kwargs: dict) -> None:
    kwargs = dict(kwargs)
    path = kwargs.pop("path", path)
    with api_server.client() as client:
        response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]


def test_too_large_is_refused_before_the_body_is_read(api_server: Server) -> None:
    port = int(api_server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /v1/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {50 << 20}\r\n\r\n".encode())
        sock.sendall(b"--b\r\n" + b"x" * 65536)  # 64 KB of a declared 50 MB: the answer comes anyway
        reply = b""
        while b'"too_large"' not in reply and (chunk := sock.recv(65536)):  # headers and body may come apart
            reply += chunk
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and '"too_large"' in reply

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(24):
            yield b"\0" * 65536

    with api_server.client() as client:
        response = client.post("/v1/search", content=chunks(),
                               headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and response.json()["error"] == "too_large"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_concurrent_burst_is_batched_and_never_5xx(api_server: Server) -> None:
    _, uris, _ = stored(api_server)
    files = [Path(u).read_bytes() for u in uris if "::" not in u][:50]
    with api_server.client() as client:
        before = client.get("/metrics").text

        def upload(data: bytes) -> int:
            return client.post("/v1/score", files={"image": ("a.jpg", data, "image/jpeg")}).status_code

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(upload, files))
        after = client.get("/metrics").text
    assert codes == [200] * 50
    def grown(name: str) -> float:
        return metric(after, name, stage="encode") - metric(before, name, stage="encode")

    items, batches = grown("pnsfw_batch_size_sum"), grown("pnsfw_batch_size_count")
    assert items == 50 and batches < 50, (items, batches)  # several uploads shared a forward pass
    assert metric(after, "pnsfw_batch_size_bucket", stage="encode", le="1") < metric(
        after, "pnsfw_batch_size_count", stage="encode")
    assert metric(after, "pnsfw_requests_total", method="POST", route="/v1/score", status="200") >= 50
    assert 'pnsfw_request_seconds_bucket{route="/v1/score",le="+Inf"}' in after


def test_no_request_in_this_module_got_a_5xx(api_server: Server) -> None:
    with api_server.client() as client:
        text = client.get("/metrics").text
    assert "pnsfw_requests_total" in text
    assert not re.search(r'^pnsfw_requests_total\{.*status="5\d\d"\}', text, re.M), text
    assert "Traceback" not in api_server.log_text()


FAST_CASES = [  # (path, JSON body or raw bytes): valid ones take the fast path, the rest fall through to FastAPI
    ("/v1/search", lambda v: {"embedding": v, "k": 5}),
    ("/v1/search", lambda v: {"embedding": v}),
    ("/v1/score", lambda v: {"embedding": v}),
    ("/v1/search", lambda v: {"embedding": v, "k": 0}),
    ("/v1/search", lambda v: {"embedding": v, "k": 1001}),
    ("/v1/search", lambda v: {"embedding": v, "k": True}),
    ("/v1/search", lambda v: {"embedding": v, "k": 3, "extra": 1}),
    ("/v1/search", lambda v: {"embedding": v, "id": 0}),
    ("/v1/search", lambda v: {"id": 0, "k": 3}),
    ("/v1/search", lambda v: {"embedding": [str(x) for x in v], "k": 3}),
    ("/v1/score", lambda v: {"embedding": v[:3]}),
    ("/v1/score", lambda v: {"embedding": v, "k": 3}),
    ("/v1/score", lambda v: [v]),
    ("/v1/score", lambda v: ('{"embedding": [NaN' + ", 0" * (len(v) - 1) + "]}").encode()),
    ("/v1/search", lambda v: b'{"embedding": [1, 2'),
]


def test_fast_path_answers_exactly_like_the_routes(api_server: Server) -> None:
    """pnsfw/api/fastpath.py: same status and bytes with and without it, valid or not; metrics label it."""
    from fastapi.testclient import TestClient

    from pnsfw.api.app import create_app
    from pnsfw.api.engine import Settings

    vector = stored(api_server)[2][3].tolist()
    answers = {}
    for fast in (True, False):
        app = create_app(api_server.store, None, Settings(device="cpu", preload=False, fast_path=fast, token=None))
        with TestClient(app) as client:
            answers[fast] = [_post(client, path, make(vector)) for path, make in FAST_CASES]
            metrics = client.get("/metrics").text
        assert metric(metrics, "pnsfw_requests_total", method="POST", route="/v1/search", status="200") == 3
    assert [code for code, _ in answers[True]] == [200, 200, 200, 422, 422, 422, 422, 422, 200, 422, 422, 422,
                                                    422, 422, 422]  # strict types: k true, numbers as strings
    assert answers[True] == answers[False]


def _post(client: "httpx.Client", path: str, body: "object") -> tuple[int, bytes]:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    return response.status_code, response.content


@pytest.fixture(scope="module")
def exact_server(api_server: Server, tmp_path_factory: pytest.TempPathFactory):
    """The same store served with `--search exact` (torch on the CPU)."""
    from api_server import start_server

    yield from start_server(api_server.store, tmp_path_factory.mktemp("exact") / "server.log", "--search", "exact")


def test_exact_search_backend_serves_the_index_hits(api_server: Server, exact_server: Server) -> None:
    """The same hits from both backends; where two stored vectors tie for a place (fp16 vectors of a tiny model
    do), either may hold it, so each hit's similarity is checked against the stored vectors instead."""
    ids, _, vectors = stored(api_server)
    row = {i: n for n, i in enumerate(ids)}
    with api_server.client() as index_client, exact_server.client() as exact_client:
        stats = exact_client.get("/v1/stats").json()["search"]
        assert stats["backend"] == "torch-exact" and stats["device"] == "cpu"
        assert index_client.get("/v1/stats").json()["search"]["backend"] == "faiss"
        for vector in vectors[::17]:
            body = {"embedding": vector.tolist(), "k": 6}
            a, b = (c.post("/v1/search", json=body).json() for c in (index_client, exact_client))
            similarities = [[h["similarity"] for h in r["hits"]] for r in (a, b)]
            np.testing.assert_allclose(*similarities, atol=1e-5)
            for result in (a, b):
                true = [float(vectors[row[h["id"]]] @ vector) for h in result["hits"]]
                np.testing.assert_allclose([h["similarity"] for h in result["hits"]], true, atol=1e-3)
            same = [x["id"] == y["id"] for x, y in zip(a["hits"], b["hits"])]
            assert sum(same) >= len(same) - 2  # at most one tie swapped or cut at the k-th place
            assert a["verdict"] == b["verdict"]
            # a server still reading the bulk scores computes a hit's p_nsfw from its vector: equal within float32
            paired = [(x["p_nsfw"], y["p_nsfw"]) for x, y, s in zip(a["hits"], b["hits"], same) if s]
            np.testing.assert_allclose(*zip(*paired), rtol=0, atol=1e-6)


def _shape(verdict: dict) -> dict:
    """Keys, value types and class names of a verdict: what must be the same on every route and command."""
    return {"keys": list(verdict), "types": {k: type(v).__name__ for k, v in verdict.items()},
            "classes": list(verdict["probabilities"])}


def test_one_verdict_shape_on_every_route_and_command(api_server: Server) -> None:
    from click.testing import CliRunner

    from pnsfw.cli import cli

    item_id, uri = uri_of(api_server, "nsfw")
    vector = stored(api_server)[2][0].tolist()
    with api_server.client() as client:
        found = {"/v1/score": client.post("/v1/score", json={"embedding": vector}).json(),
                 "/v1/score upload": client.post("/v1/score",
                                                 files={"image": ("a.jpg", Path(uri).read_bytes())}).json(),
                 "/v1/search": client.post("/v1/search", json={"id": item_id, "k": 2}).json()["verdict"],
                 "/v1/explain": client.post("/v1/explain", json={"id": item_id, "k": 2}).json()["verdict"],
                 "/v1/items": client.get(f"/v1/items/{item_id}").json()["verdict"]}
    runner, store = CliRunner(), str(api_server.store)
    predict = runner.invoke(cli, ["predict", uri, "--store", store, "--device", "cpu", "--json"])
    explain = runner.invoke(cli, ["explain", "--store", store, "--model", "default", "--id", str(item_id), "--json"])
    assert predict.exit_code == 0 and explain.exit_code == 0, predict.output + explain.output
    found["predict --json"] = json.loads(predict.stdout)[0]["verdict"]
    found["explain --json"] = json.loads(explain.stdout)["verdict"]
    expected = {"keys": ["model", "p_nsfw", "threshold", "nsfw", "label", "probabilities"],
                "types": {"model": "str", "p_nsfw": "float", "threshold": "float", "nsfw": "bool", "label": "str",
                          "probabilities": "dict"}, "classes": ["nsfw", "sfw"]}
    assert {where: _shape(v) for where, v in found.items()} == {where: expected for where in found}
    assert found["/v1/explain"]["p_nsfw"] == pytest.approx(found["explain --json"]["p_nsfw"], abs=1e-6)
    assert found["/v1/score upload"]["p_nsfw"] == pytest.approx(found["predict --json"]["p_nsfw"], abs=1e-5)


def test_too_large_is_readable_by_every_common_client(api_server: Server, tmp_path: Path) -> None:
    """The 413 arrives whole with urllib (which sends the entire body before reading), requests, httpx, curl."""
    import subprocess
    import urllib.error
    import urllib.request

    import requests

    body, url = b"\0" * (40 << 20), f"{api_server.base}/v1/score"  # 40 MB: more than the socket buffers hold
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    answers = {}
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"), timeout=60)
    except urllib.error.HTTPError as exc:
        answers["urllib"] = (exc.code, json.loads(exc.read())["error"])
    reply = requests.post(url, data=body, headers=headers, timeout=60)
    answers["requests"] = (reply.status_code, reply.json()["error"])
    with api_server.client() as client:
        reply = client.post("/v1/score", content=body, headers={"Content-Type": "application/octet-stream"})
    answers["httpx"] = (reply.status_code, reply.json()["error"])
    (tmp_path / "big.bin").write_bytes(body)
    done = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "out.json"), "-w", "%{http_code}", "-X", "POST",
                           "-H", f"Authorization: Bearer {TOKEN}", "--data-binary", f"@{tmp_path / 'big.bin'}", url],
                          capture_output=True, text=True, timeout=60)
    answers["curl"] = (int(done.stdout or 0), json.loads((tmp_path / "out.json").read_text())["error"])
    assert answers == {name: (413, "too_large") for name in ("urllib", "requests", "httpx", "curl")}, done.stderr


def test_while_serving_the_objects_alive_at_startup_are_out_of_the_collectors_sight(api_server: Server) -> None:
    """Each full collection walked torch's objects with the event loop stopped: 130-210 ms pauses under load
    (docs/benchmarks.md). The app freezes what its startup made, and gives it back when it stops."""
    import gc

    from fastapi.testclient import TestClient

    from pnsfw.api.app import create_app
    from pnsfw.api.engine import Settings

    app = create_app(api_server.store, None, Settings(device="cpu", preload=False, token=None))
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200 and (frozen := gc.get_freeze_count()) > 0
        app.state.engine.encoder()  # loaded after the startup (lazily, or in the background): frozen too
        assert gc.get_freeze_count() > frozen
        cycle, gone = _cycle()  # a replaced searcher's Keras model is full of cycles: freed at the reload
        gc.freeze()
        del cycle
        app.state.engine.reload()
        assert gone() is None and gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def _cycle() -> tuple[object, Callable[[], object]]:
    import weakref

    class Node:
        pass

    node = Node()
    node.me = node  # type: ignore[attr-defined]
    return node, weakref.ref(node)
