"""Launching runs on Ray: `alignprop train` (train.py), the driver session it shares with `alignprop
tune` (session.py: preflight, lock, Ray, MLflow run, Ctrl-C), the Ray Train side of a run
(trainer.py: the TorchTrainer and its per-worker entry), the Ray it runs on (ray_cluster.py, with a
local Ray bound to loopback: loopback.py, ended with its driver: reaper.py), checkpoint room and
integrity on the driver (storage.py), the closing summary (summary.py) and `alignprop runs show` (show.py).

    alignprop train --config tiny-cpu                       # local Ray, ./mlflow.db
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- alignprop train --config tiny-cpu
"""

from .ray_cluster import (check_local_resources, free_local_port, init_ray, ray_address, wait_for_cluster_resources,
                          worker_resources)
from .session import driver_session, resolve_storage_path, resolved_tracking_uri
from .train import TrainOutcome, check_resume_safety, dry_run, launch
from .trainer import build_trainer, fit_interruptibly, run_interruptibly, train_loop_per_worker

__all__ = ["TrainOutcome", "build_trainer", "check_local_resources", "check_resume_safety", "driver_session", "dry_run",
           "fit_interruptibly", "free_local_port", "init_ray", "launch", "ray_address", "resolve_storage_path",
           "resolved_tracking_uri", "run_interruptibly", "train_loop_per_worker", "wait_for_cluster_resources",
           "worker_resources"]
