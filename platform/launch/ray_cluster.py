"""The Ray a run uses: a cluster named by `ray.address`/RAY_ADDRESS (probed with a 5 s timeout), or a local
Ray of our own bound to 127.0.0.1; the resources the run's workers need, refused up front where this
machine cannot hold them, awaited (autoscaling) on a cluster.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Optional

from ..config import RunConfig
from ..console import filter_ray_worker_logs
from ..errors import ConfigError
from .loopback import enter_loopback_mode


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    """What one Train worker reserves (Ray Train's rule: CPU 1 by default, GPU 1 with use_gpu)."""
    per = {k: float(v) for k, v in cfg.ray.resources_per_worker.items() if v}
    per = per or ({} if cfg.ray.use_gpu else {"CPU": 1.0})
    if cfg.ray.use_gpu:
        per.setdefault("GPU", 1.0)
    return per


def ray_address(cfg: RunConfig) -> Optional[str]:
    """The cluster to join (ray.address, else RAY_ADDRESS), probed with a short timeout; None: a
    new local Ray of our own (never an unrelated `ray start` cluster found on this machine)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    if address != "auto":
        hostport = address.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        default = 10001 if address.startswith("ray://") else 8265 if address.startswith("http") else 6379
        host, port = (host or hostport), (int(port) if port.isdigit() else default)
        try:
            socket.create_connection((host.strip("[]"), port), timeout=5).close()
        except OSError as err:
            raise ConfigError(f"ray.address: cannot reach {address} ({err.strerror or err}); accepted: a running "
                              "cluster "
                              "(the address `ray start --head` prints, or ray://<head>:10001), "
                              "or unset for a local Ray") from None
    return address


def check_local_resources(cfg: RunConfig) -> None:
    """Before starting a local Ray: refuse what this machine cannot hold (no waiting forever)."""
    import torch

    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    _check_fits(cfg, have, "this machine")


def _check_fits(cfg: RunConfig, have: dict[str, float], where: str) -> None:
    per, n = worker_resources(cfg), cfg.ray.num_workers
    for key, amount in per.items():
        if amount * n > have.get(key, 0.0) + 1e-9:
            shown = ", ".join(f"{k}: {v:g}" for k,
                              v in sorted(have.items()) if not k.startswith(("node:", "memory", "object_store")))
            raise ConfigError(f"ray.num_workers/ray.resources_per_worker: {n} workers × {{{key}: {amount:g}}} need "
                              f"{key} {amount * n:g} "
                              f"but {where} has {{{shown}}}; accepted: fewer workers or smaller resources_per_worker"
                              + ("" if key != "GPU" else ", or ray.use_gpu=false"))


def wait_for_cluster_resources(cfg: RunConfig) -> None:
    """On a cluster: the resources must exist, or appear (autoscaling) within ray.resource_wait_s."""
    import ray

    wait = 600.0 if cfg.ray.resource_wait_s is None else cfg.ray.resource_wait_s
    deadline = time.monotonic() + wait
    while True:
        try:
            _check_fits(cfg, ray.cluster_resources(), "the cluster")
            return
        except ConfigError as err:
            if time.monotonic() >= deadline:
                raise
            print(f"[alignprop] waiting up to {deadline - time.monotonic():.0f} s for the cluster to scale up ({err}); "
                  "Ctrl-C stops, ray.resource_wait_s=0 fails at once", file=sys.stderr, flush=True)
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def init_ray(address: Optional[str]) -> bool:
    """Join `address`, or start a local Ray bound to 127.0.0.1 only. Returns True if this call
    started Ray (the caller shuts it down), False if Ray was already initialised or a cluster joined."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        enter_loopback_mode()
        # Ray Train's actors query the state API with no address: with another Ray on this machine
        # that auto-detection fails ("Found multiple active Ray instances"). Name ours to them.
        dashboard_port = free_local_port()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}})
        filter_ray_worker_logs()
        return True
    ray.init(address=address, log_to_driver=True, configure_logging=False)
    filter_ray_worker_logs()
    return False


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
