"""URL limits against a real local HTTP server: --timeout bounds a whole fetch, --max-download caps the body
(both become error rows), and a huge body costs no memory."""

import http.server
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import class_image

from pnsfw.cli import cli
from pnsfw.indexer.fetch import DownloadTooLarge, read_url
from pnsfw.store import Store

PIECE = b"\0" * (1 << 20)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    class_image("sfw", 3, (40, 32)).save(buf, "JPEG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        try:
            getattr(self, "_" + self.path.strip("/").split(".")[0], self._missing)()
        except OSError:  # the client gave up: expected for the slow and the endless bodies
            pass

    def _ok(self) -> None:
        body = _jpeg()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow(self) -> None:
        """A byte every 0.1 s for a minute: every read succeeds, the whole never ends in time."""
        self.send_response(200)
        self.send_header("Content-Length", "600")
        self.end_headers()
        for _ in range(600):
            self.wfile.write(b"\xff")
            self.wfile.flush()
            time.sleep(0.1)

    def _huge(self) -> None:
        """Announces 4 GB and sends it lazily."""
        self.send_response(200)
        self.send_header("Content-Length", str(4 << 30))
        self.end_headers()
        for _ in range(4 << 10):
            self.wfile.write(PIECE)

    def _endless(self) -> None:
        """No length: the body ends when the connection does (never, unless the client stops)."""
        self.send_response(200)
        self.end_headers()
        while True:
            self.wfile.write(PIECE)

    def _missing(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_timeout_is_the_total_time_of_a_fetch(server):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_url(f"{server}/slow", timeout=1.0, max_bytes=1 << 20)
    assert time.monotonic() - started < 5  # not a benchmark: the trickle lasts a minute
    with pytest.raises(DownloadTooLarge, match="Content-Length"):
        read_url(f"{server}/huge", timeout=10, max_bytes=1 << 20)
    with pytest.raises(DownloadTooLarge, match="body over"):
        read_url(f"{server}/endless", timeout=30, max_bytes=1 << 20)
    assert read_url(f"{server}/ok.jpg", timeout=5, max_bytes=1 << 20)[:3] == b"\xff\xd8\xff"


def test_slow_and_huge_urls_become_error_rows(tmp_path, tiny_checkpoint, server):
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{server}/{name}\n" for name in ("ok.jpg", "slow", "huge", "endless", "gone.jpg")))
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["index", str(listing), "--store", str(tmp_path / "store"), "--model",
                                      str(tiny_checkpoint), "--device", "cpu", "--workers", "-1", "--no-faiss",
                                      "--timeout", "1s", "--max-download", "1M"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 30
    store = Store.open(tmp_path / "store")
    assert store.table(["uri"]).column("uri").to_pylist() == [f"{server}/ok.jpg"]
    reasons = {r["uri"].rsplit("/", 1)[1]: r["reason"] for r in store.errors().to_pylist()}
    assert reasons == {"slow": "timeout", "huge": "too_large", "endless": "too_large", "gone.jpg": "http_error"}


_PROBE = """
import sys
from pnsfw.indexer.reader import process_item
from pnsfw.indexer.sources import entry
for url in sys.argv[1:]:
    print(process_item(entry(url, "list", None), 32, timeout=60, max_download=2 << 20).reason)
with open("/proc/self/status") as f:  # VmHWM: this program's peak RSS (ru_maxrss would count a forked parent's)
    print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
"""


def test_huge_bodies_keep_memory_bounded(server):
    """The reader in a process of its own (no torch: a small baseline), its peak RSS measured by the kernel:
    without the cap it would hold gigabytes (4 GB announced, an endless stream), with it a few MB."""
    cmd = [sys.executable, "-c", _PROBE, f"{server}/endless", f"{server}/huge", f"{server}/ok.jpg"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *reasons, peak_kib = proc.stdout.split()
    assert reasons == ["too_large", "too_large"], proc.stdout  # ok.jpg: no reason
    assert int(peak_kib) < 250_000, peak_kib  # measured ~125 MB (numpy + PIL)


def test_no_process_wide_socket_timeout():
    import ast

    root = Path(__file__).resolve().parents[1] / "pnsfw"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "setdefaulttimeout":
                pytest.fail(f"{path} sets the process-wide socket timeout")
