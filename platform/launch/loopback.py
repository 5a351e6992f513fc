"""A local Ray that listens on 127.0.0.1 only, torch.distributed rendezvous included.

    alignprop train --config tiny-cpu      # no ray.address / RAY_ADDRESS: a loopback Ray of our own

Three things are needed, each measured (tests/test_run_safety.py lists every listening socket):
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's documented single-node mode): without it Ray on Linux
  replaces `_node_ip_address="127.0.0.1"` by the routable address and its GCS, raylet, agents and
  workers listen there.
- `GLOO_SOCKET_IFNAME=lo` / `NCCL_SOCKET_IFNAME=lo`: the collective libraries' own listeners.
- torch's c10d TCPStore server binds the wildcard address whatever MASTER_ADDR says; its only
  bind control is `master_listen_fd`. `LoopbackTorchConfig` hands rank 0's store a socket bound to
  127.0.0.1 (Ray Train's own torch backend offers only init_method env/tcp, both wildcard).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_NODE_IP_ADDRESS": LOOPBACK,
                "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def enter_loopback_mode() -> None:
    """Before `ray.init` of a local Ray: children inherit the environment; this process's Ray
    read the flag at import, so set its constant too."""
    os.environ.update(LOOPBACK_ENV)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def on_loopback_node() -> bool:
    return ray.util.get_node_ip_address() == LOOPBACK


def _bind_listener() -> tuple[int, int]:
    """Rank 0: a listening socket on 127.0.0.1:<free port>; its fd is kept open for the store."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(2048)
    return sock.getsockname()[1], sock.detach()


def _set_master(port: int) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))


def _init_process_group(backend: str, world_rank: int, world_size: int, port: int, listen_fd: int | None,
                        timeout_s: int) -> None:
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":  # what Ray's backend sets: fail on NCCL timeouts rather than hang
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=world_rank == 0, timeout=timeout,
                          **({"master_listen_fd": listen_fd} if world_rank == 0 else {}))
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend (shutdown, env vars, CUDA sharing) with a loopback-only store."""

    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig") -> None:
        backend = backend_config.backend or "gloo"
        port, listen_fd = worker_group.execute_single(0, _bind_listener)
        worker_group.execute(_set_master, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(
                rank, _init_process_group, backend=backend, world_rank=rank, world_size=len(worker_group), port=port,
                listen_fd=listen_fd if rank == 0 else None, timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))
        ])


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
