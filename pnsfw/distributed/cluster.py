"""Joining a Ray cluster (an address) or starting a local one (no address)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import PnsfwError

log = logging.getLogger("pnsfw.distributed")
FORWARDED_PREFIXES = ("AWS_",)
FORWARDED = ("GOOGLE_APPLICATION_CREDENTIALS",)


class RayUnavailable(PnsfwError):
    """Ray is not installed, or the cluster cannot be reached."""


@dataclass
class RayCluster:
    """What the driver knows about the cluster it runs on."""

    address: str
    cpus: int
    gpus: int
    owned: bool = False  # this process called ray.init (not its caller): `disconnect` shuts Ray down

    def uses_gpus(self, device: str) -> bool:
        return self.gpus > 0 and device != "cpu"

    def actors(self, wanted: int, device: str) -> int:
        """Embedding actors: `wanted`, else one per GPU on a GPU cluster, else one per 2 CPUs (at least 1)."""
        if wanted > 0:
            return wanted
        if self.uses_gpus(device):
            return self.gpus
        return max(1, self.cpus // 2)


RETRIES = 3  # a call retried on a restarted actor this often; then the caller makes it error rows or one line


def actor_options(gpu: bool, **extra: Any) -> dict[str, Any]:
    """ray.remote options of a job's actors: one GPU each on a GPU cluster, else one CPU; a lost actor is
    restarted, and its calls retried RETRIES times (a unit that kills its actor every time must not hang)."""
    return {"num_cpus": 0 if gpu else 1, "num_gpus": 1 if gpu else 0, "max_restarts": -1,
            "max_task_retries": RETRIES, **extra}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs Ray: pip install 'pnsfw[ray]'") from None
    return ray


def connect(address: str | None, data: bool = True) -> RayCluster:
    """`ray.init` on ADDRESS (`ray://host:port` or `host:port`), or a new local Ray when it is None or empty.
    data: the run uses Ray Data (its context set up: ordered output, no progress bars). `score --ray` does not:
    importing ray.data alone costs ~0.6 s, and a Ray Data job starts its helper actors (measured 2.5-4.9 s of
    a 2-core machine for 20 trivial units against 0.5-0.8 s for two plain actors)."""
    ray = _import_ray()
    owned = not ray.is_initialized()
    if owned:
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                                  "runtime_env": {"env_vars": forwarded_env()}}
        if not address:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=address or None, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"cannot join the Ray cluster at {address or 'a new local cluster'}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    resources = ray.cluster_resources()
    cluster = RayCluster(address or "local", int(resources.get("CPU", 0)), int(resources.get("GPU", 0)), owned)
    log.info("ray: %s, %d CPUs, %d GPUs", cluster.address, cluster.cpus, cluster.gpus)
    if data:
        _quiet_data_context()
    return cluster


def disconnect(cluster: RayCluster) -> None:
    """`ray.shutdown()` when `connect` started this process's Ray: explicitly, it took 0.02 s where the
    interpreter's exit hook took ~0.9 s (measured on the 2-core benchmark machine), and the job's actors go with
    it. A caller's own Ray session is left alone."""
    if cluster.owned:
        import ray

        ray.shutdown()


def forwarded_env() -> dict[str, str]:
    """The object-store settings of the driver (AWS_*, GOOGLE_APPLICATION_CREDENTIALS), given to the job's
    workers, so `--store s3://...` reaches the same endpoint with the same credentials from every node."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED}


def _quiet_data_context() -> None:
    """Ordered output (the driver commits in unit order) and no Ray progress bars on the user's terminal."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "execution finished" lines are not for users
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
