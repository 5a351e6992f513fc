"""Launch one AlignProp run on Ray Train (local Ray by default, a cluster via ray.address/RAY_ADDRESS).

    alignprop train --config tiny-cpu                       # local Ray, ./mlflow.db
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- alignprop train --config tiny-cpu

Rerunning with the same run name (deterministic, see `config.run_name`) and storage path resumes
from the last committed checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from alignprop.platform.config import RunConfig, flatten, from_dict, run_name, to_dict, to_yaml
from alignprop.platform.tracking import open_run, resolve_tracking_uri, run_status


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: Optional[str]  # the last checkpoint directory (Ray storage)
    metrics: dict[str, Any]


def resolve_storage_path(storage_path: Optional[str]) -> str:
    """None → ~/ray_results; local paths absolute (the driver's view); URIs (s3://, gs://) as given."""
    if storage_path and "://" in storage_path:
        return storage_path
    return str(Path(storage_path or "~/ray_results").expanduser().resolve())


def resolved_tracking_uri(cfg: RunConfig) -> str:
    return resolve_tracking_uri(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry: build the recipe, resume from Ray's checkpoint, train."""
    import ray.train
    import ray.train.torch
    import torch

    from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _quiet_ray_train_reports()
    cfg, context = from_dict(config["run"]), ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        recipe = AlignPropRecipe(cfg, WorkerContext(
            rank=context.get_world_rank(), world_size=context.get_world_size(),
            device=ray.train.torch.get_device(), report=report, resume_dir=resume_dir,
            tracking_uri=config["tracking_uri"], run_id=config["run_id"],
        )).setup()
    recipe.train()


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every report of every rank at INFO (the whole metrics dict, per step);
    our rank-0 progress bar and MLflow already carry them."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that internal module: keep its logging
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def init_ray(address: Optional[str]) -> None:
    import ray

    if not ray.is_initialized():
        # Local by default; RAY_ADDRESS or ray.address reaches a cluster. Dashboard on 127.0.0.1.
        ray.init(address=address, log_to_driver=True, configure_logging=False)


def build_trainer(cfg: RunConfig, tracking_uri: str, run_id: str, callbacks: Sequence[Any] = (),
                  storage_path: Optional[str] = None):
    """The TorchTrainer of one run; the same for `alignprop train` and every sweep trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=dict(cfg.ray.resources_per_worker) or None,
        ),
        run_config=RayRunConfig(
            name=run_name(cfg), storage_path=storage_path or resolve_storage_path(cfg.ray.storage_path),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def launch(cfg: RunConfig) -> TrainOutcome:
    """Open the MLflow run, start the TorchTrainer, wait; marks the MLflow run FINISHED/FAILED."""
    name = run_name(cfg)
    uri = resolved_tracking_uri(cfg)
    run_id = open_run(uri, cfg.tracking.experiment or cfg.name, name, flatten(to_dict(cfg)), to_yaml(cfg))
    print(f"[alignprop] run {name}  mlflow {uri} run_id={run_id}", file=sys.stderr)
    init_ray(cfg.ray.address)
    with run_status(uri, run_id):
        result = build_trainer(cfg, uri, run_id).fit()
    return TrainOutcome(
        run_name=name, mlflow_run_id=run_id, tracking_uri=uri,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
    )
