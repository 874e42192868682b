"""A real Ray cluster for the distributed tests: `ray start --head --block` on free ports, stopped after.

Only this cluster's own processes are stopped (its process group), never other Ray clusters on the machine.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
START_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_ports() -> list[str]:
    """Ports that default to fixed numbers, made free ones so two clusters (two test runs) can coexist."""
    names = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port")
    return [arg for name in names for arg in (name, str(free_port()))]


def _ready(address: str, log: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        probe = subprocess.run([str(RAY), "status", "--address", address], capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"ray did not start within {START_S} s:\n{log.read_text(errors='replace')[-3000:]}")


@dataclass(frozen=True)
class Cluster:
    address: str  # host:port of the head node
    session: int  # session id of every process of this cluster (its own, started with start_new_session)

    def processes(self, title: str) -> list[int]:
        """Pids of this cluster's processes whose command line contains `title` (Ray names workers by actor)."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) == self.session and \
                        title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


def start_cluster(root: Path, cpus: int = 2) -> Iterator[Cluster]:
    """Yield a new head node whose workers import this checkout's pnsfw."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               RAY_USAGE_STATS_ENABLED="0")
    log = root / "ray.log"
    command = [str(RAY), "start", "--head", "--block", "--num-cpus", str(cpus), "--num-gpus", "0",
               "--port", str(port), "--include-dashboard=false", "--disable-usage-stats",
               "--temp-dir", tempfile.mkdtemp(prefix="ray", dir="/tmp"), "--node-ip-address", "127.0.0.1",
               *_own_ports()]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        _ready(address, log, process)
        yield Cluster(address, process.pid)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    # `ray start --block` takes over 30 s to honour SIGTERM here; the cluster and its temp dir are the test's own
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
