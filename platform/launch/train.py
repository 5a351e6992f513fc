"""`alignprop train`: one AlignProp run on Ray Train (local Ray by default, a cluster via
ray.address/RAY_ADDRESS), tracked in MLflow, with an MLflow Model at the end.

    alignprop train --config tiny-cpu                       # local Ray, ./mlflow.db
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- alignprop train --config tiny-cpu

Rerunning with the same run name (deterministic, see `config.run_name`) and storage path resumes
from the last committed checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ...trainers.checkpoint import check_checkpoint_files
from ..config import RunConfig, flatten, run_name, to_dict, to_yaml
from ..mlflow_model import check_model_name, log_run_model, register_model
from ..tracking import prompt_sets
from .session import driver_session, resolve_storage_path, resolved_tracking_uri
from .trainer import build_trainer, fit_interruptibly


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: Optional[str]  # the last checkpoint directory (Ray storage)
    metrics: dict[str, Any]
    model_uri: Optional[str] = None  # the run's MLflow Model: runs:/<run_id>/model
    registered: Optional[str] = None  # with --register NAME: models:/NAME/<version>, which alias `best` now names


def check_resume_safety(storage: str, name: str) -> None:
    """Refuse, before anything starts, checkpoints holding files we would not load (pickles)."""
    if "://" in storage:
        return  # remote storage: the worker checks the checkpoint it is given
    for directory in sorted((Path(storage) / name).glob("checkpoint_*")):
        if directory.is_dir():
            check_checkpoint_files(directory)


def launch(cfg: RunConfig, register: Optional[str] = None) -> TrainOutcome:
    """Check what can be checked, then in the driver session (launch/session.py: lock, Ray, MLflow
    run) fit, log the run's MLflow Model and register it as `register` (alias `best`)."""
    if register is not None:
        check_model_name(register)
    name, uri = run_name(cfg), resolved_tracking_uri(cfg)
    storage = resolve_storage_path(cfg.ray.storage_path)
    check_resume_safety(storage, name)
    with driver_session(cfg, name, storage, uri, cfg.tracking.experiment or cfg.name, flatten(to_dict(cfg)),
                        to_yaml(cfg), datasets=prompt_sets(cfg)) as run_id:
        print(f"[alignprop] run {name}  mlflow {uri} run_id={run_id}", file=sys.stderr)
        result = fit_interruptibly(build_trainer(cfg, uri, run_id))
        model_uri = log_run_model(uri, run_id)
        registered = register_model(uri, register, run_id) if register else None
    return TrainOutcome(
        run_name=name, mlflow_run_id=run_id, tracking_uri=uri,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}), model_uri=model_uri, registered=registered,
    )
