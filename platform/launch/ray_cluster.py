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
from ..errors import ConfigError, RunFailedError
from .loopback import enter_loopback_mode
from .reaper import start_reaper


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
            reason = err.strerror or err
            raise ConfigError(f"ray.address: cannot reach {address} ({reason}); accepted: {ADDRESS_ACCEPTED}") from None
        if not address.startswith(("ray://", "http://", "https://")) and _answers_http1(host.strip("[]"), port):
            raise ConfigError(f"ray.address: {address} answers as a web server, not a Ray cluster's GCS (the dashboard "
                              f"is not the address to join); accepted: {ADDRESS_ACCEPTED}")
    return address


ADDRESS_ACCEPTED = ("a running cluster (the address `ray start --head` prints, host:6379, or ray://<head>:10001), or "
                    "unset for a local Ray")


def _answers_http1(host: str, port: int, timeout_s: float = 5.0) -> bool:
    """Whether the port speaks HTTP/1 (a web server): Ray's GCS speaks gRPC (HTTP/2) and never answers
    an HTTP/1 request line with one. `ray.init` against such a port waits forever."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: ray\r\n\r\n")
            return conn.recv(8).startswith(b"HTTP/1.")
    except OSError:  # a reset or a silent peer: not a web server
        return False


WORKER_MEMORY_MB = 1024  # a Train worker's resident memory with the tiny pipeline, measured (NOTES.md): the least
MB = 2**20


def check_local_resources(cfg: RunConfig) -> None:
    """Before starting a local Ray: refuse what this machine cannot hold (no waiting forever): CPUs and
    GPUs as Ray counts them, and memory for the workers (each at least WORKER_MEMORY_MB)."""
    import psutil
    import torch

    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    _check_fits(cfg, have, "this machine")
    available, n = psutil.virtual_memory().available, cfg.ray.num_workers
    if n * WORKER_MEMORY_MB * MB > available:
        raise ConfigError(f"ray.num_workers: {n} workers need at least {n * WORKER_MEMORY_MB} MB of memory "
                          f"({WORKER_MEMORY_MB} MB each) but this machine has {available // MB} MB available; "
                          "accepted: fewer workers, or a cluster (ray.address)")


def _check_fits(cfg: RunConfig, have: dict[str, float], where: str) -> None:
    per, n = worker_resources(cfg), cfg.ray.num_workers
    for key, amount in per.items():
        if amount * n > have.get(key, 0.0) + 1e-9:
            counted = sorted((k, v) for k, v in have.items() if not k.startswith(("node:", "memory", "object_store")))
            shown = ", ".join(f"{k}: {v:g}" for k, v in counted)
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


def init_ray(address: Optional[str], start_timeout_s: float = 120.0) -> bool:
    """Join `address`, or start a local Ray bound to 127.0.0.1 only (and a reaper that ends it if this
    driver is killed). Returns True if this call started Ray (the caller shuts it down), False if Ray
    was already initialised or a cluster joined."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        _start_local_ray(start_timeout_s)
        start_reaper()
        filter_ray_worker_logs()
        return True
    ray.init(address=address, log_to_driver=True, configure_logging=False)
    filter_ray_worker_logs()
    return False


STARTUP_TIMEOUT = "The current node timed out during startup"  # Ray's own wait for its raylet: 30 s, fixed


def _start_local_ray(start_timeout_s: float) -> None:
    """`ray.init` of a local Ray, again after a node that timed out during startup (a loaded machine),
    until `ray.start_timeout_s`; then one line saying what to do."""
    import ray

    enter_loopback_mode()
    deadline = time.monotonic() + start_timeout_s
    while True:
        # Ray Train's actors query the state API with no address: with another Ray on this machine
        # that auto-detection fails ("Found multiple active Ray instances"). Name ours to them.
        dashboard_port = free_local_port()
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=dashboard_port, log_to_driver=True, configure_logging=False,
                     runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}})
            return
        except Exception as err:
            if STARTUP_TIMEOUT not in str(err):
                raise
            ray.shutdown()
            if time.monotonic() >= deadline:
                raise RunFailedError(f"ray.start_timeout_s: the local Ray did not start within {start_timeout_s:g} s "
                                     "(its raylet timed out; the machine is busy?); accepted: rerun when it is less "
                                     "loaded, a larger ray.start_timeout_s, or a running cluster (ray.address)"
                                     ) from None
            print("[alignprop] the local Ray timed out during startup (a busy machine): starting it again",
                  file=sys.stderr, flush=True)


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
