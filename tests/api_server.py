"""A real `pnsfw serve` process for the API tests: a copy of labelled_store, a trained model, a tar source."""

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from conftest import class_image, index_folder

TOKEN = "s3cret-test-token"
REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 120


@dataclass
class Server:
    base: str
    token: str
    store: Path
    log: Path
    process: subprocess.Popen

    def client(self, token: "str | None" = TOKEN, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def make_tar(path: Path, count: int = 3) -> Path:
    """A webdataset-style tar of a few images, so item images are also served from tar members."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buffer = io.BytesIO()
            class_image("sfw", 100 + i).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"shard/{i:03d}.png")
            info.size = buffer.tell()
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path


def prepare_store(root: Path, labelled_store: Path, checkpoint: Path) -> Path:
    from pnsfw.classifier.train import TrainOptions, train_classifier

    store = root / "store"
    shutil.copytree(labelled_store, store)
    train_classifier(store, "folders", TrainOptions(epochs=3))
    index_folder(make_tar(root / "extra.tar"), store, checkpoint)
    return store


def _wait_for_port(log: Path, process: subprocess.Popen) -> int:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"pnsfw serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"pnsfw serve did not start in {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def start_server(store: Path, log: Path, *extra: str) -> Iterator[Server]:
    """`python -m pnsfw.cli serve` on a free loopback port (port 0), token-guarded; stopped afterwards."""
    env = dict(os.environ, PNSFW_API_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "pnsfw.cli", "serve", "--store", str(store), "--port", "0",
               "--device", "cpu", "--max-upload-mb", "1", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = _wait_for_port(log, process)
        server = Server(f"http://127.0.0.1:{port}", TOKEN, store, log, process)
        assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
