"""The driver's session, the one skeleton of `alignprop train` and `alignprop tune`:

    with driver_session(cfg, name, storage, uri, experiment, params, config_yaml) as run_id:
        ...  # fit, log, summarise

preflight (the Ray address probed, local resources checked, the tracking URI probed) → the run's
lock in `<storage>/<name>/.alignprop.lock` → Ray up (a local Ray of our own, or the cluster) → the
MLflow run open with its heartbeat. Closing runs in reverse: the run ends FINISHED, FAILED (an
error) or KILLED (Ctrl-C), the lock is released, and a local Ray we started is shut down — except
on Ctrl-C, where the caller exits the process at once and the local Ray's daemons (started with
kill-on-parent-death) and a cluster's Train controller (whose owner, this driver, is gone) end with
it: shutting Ray down under the fit thread, still in `ray.get`, makes Ray's core worker end the
process with exit 1 instead.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..config import ConfigError, RunConfig
from ..tracking import PromptSet, probe_tracking_uri, resolve_tracking_uri, run_lock, tracked_run
from .storage import check_free_space
from .ray_cluster import check_local_resources, init_ray, ray_address, wait_for_cluster_resources


def resolve_storage_path(storage_path: Optional[str]) -> str:
    """None → ~/ray_results; local paths absolute (the driver's view); URIs (s3://, gs://) as given."""
    if storage_path and "://" in storage_path:
        return storage_path
    return str(Path(storage_path or "~/ray_results").expanduser().resolve())


def resolved_tracking_uri(cfg: RunConfig) -> str:
    return resolve_tracking_uri(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def preflight(cfg: RunConfig, storage: str, uri: str) -> Optional[str]:
    """What fails fast before anything is taken or written: the Ray address (probed), this machine's
    resources for a local Ray, the tracking URI, room in the storage path. Returns the Ray address."""
    import ray

    address = ray_address(cfg)
    if address is None and not ray.is_initialized():
        check_local_resources(cfg)  # one run (one sweep trial) must fit this machine
        check_op_build_lock()  # the workers build and load DeepSpeed's op on this machine
    probe_tracking_uri(uri)
    check_free_space(cfg, storage)
    return address


STALE_BUILD_LOCK_S = 600  # the CPU op builds in 1-2 min; a lock this old is left by a killed build


def extensions_dir() -> Path:
    """Where torch builds (and DeepSpeed loads) JIT ops: TORCH_EXTENSIONS_DIR, else torch's default."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def check_op_build_lock(now: Optional[float] = None) -> None:
    """A run killed while DeepSpeed compiled its op leaves torch's build `lock` behind, and every later
    run's workers wait on it forever without a word: refuse that in one line instead."""
    import time

    for lock in extensions_dir().glob("**/deepspeed_*/lock"):
        age = (now or time.time()) - lock.stat().st_mtime
        if age > STALE_BUILD_LOCK_S:
            raise ConfigError(f"TORCH_EXTENSIONS_DIR: {lock} is left by an interrupted DeepSpeed op build "
                              f"({age / 60:.0f} min old) and would stall the workers; accepted: remove it "
                              f"(rm {lock}) and rerun")


def op_build_notice() -> Optional[str]:
    """On a machine without a GPU whose DeepSpeed has not yet compiled its CPU communication op (once
    per TORCH_EXTENSIONS_DIR, the venv's under make), one line saying why the first step takes minutes."""
    import torch

    if torch.cuda.is_available():
        return None
    base = extensions_dir()
    if any(base.glob("**/deepspeed_shm_comm*.so")):
        return None
    return (f"[alignprop] first run with {base}: DeepSpeed compiles its CPU communication op before the first "
            "step (about 1-2 min of silence, once)")


@contextmanager
def driver_session(cfg: RunConfig, name: str, storage: str, uri: str, experiment: str, params: dict[str, Any],
                   config_yaml: str, tags: Optional[dict[str, str]] = None, datasets: Sequence[PromptSet] = (),
                   prepare: Optional[Callable[[], None]] = None):
    """Preflight, lock, Ray, MLflow run (see the module docstring); yields the MLflow run id.
    `prepare` runs under the lock before Ray starts (a sweep's trial plan): its errors take no resources."""
    import ray

    address = preflight(cfg, storage, uri)
    started = False
    try:
        with run_lock(storage, name):
            if prepare is not None:
                prepare()
            if address is None and (notice := op_build_notice()):
                print(notice, file=sys.stderr, flush=True)
            started = init_ray(address, cfg.ray.start_timeout_s)
            wait_for_cluster_resources(cfg)
            with tracked_run(uri, experiment, name, params, config_yaml, tags, datasets=datasets) as run_id:
                yield run_id
    except KeyboardInterrupt:
        started = False  # the process exit ends Ray (module docstring)
        raise
    finally:
        if started:
            ray.shutdown()
