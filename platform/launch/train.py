"""`alignprop train`: one AlignProp run on Ray Train (local Ray by default, a cluster via
ray.address/RAY_ADDRESS), tracked in MLflow, with an MLflow Model at the end.

    alignprop train --config tiny-cpu                       # local Ray, ./mlflow.db
    alignprop train --config tiny-cpu --dry-run             # checked and described; nothing started or written
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
from ...trainers.checkpoint_integrity import newest_valid
from ..config import RunConfig, run_name, run_params, to_yaml
from ..models import TOY_WORLD_MODEL
from ..mlflow_model import check_model_name, log_run_model, register_model
from ..tracking import RUN_NAME_TAG, prompt_sets, quote_filter_value
from ..tracking.overoptimisation import log_overoptimisation_plot
from ..toy_world import vocabulary_warning
from .session import driver_session, preflight, resolve_storage_path, resolved_tracking_uri
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
    datasets = prompt_sets(cfg)
    if cfg.model.pretrained == TOY_WORLD_MODEL and (warning := vocabulary_warning([p for d in datasets
                                                                                   for p in d.prompts])):
        print(warning, file=sys.stderr, flush=True)
    with driver_session(cfg, name, storage, uri, cfg.tracking.experiment or cfg.name, run_params(cfg),
                        to_yaml(cfg), datasets=datasets) as run_id:
        print(f"[alignprop] run {name}  mlflow {uri} run_id={run_id}", file=sys.stderr)
        result = fit_interruptibly(build_trainer(cfg, uri, run_id))
        model_uri = log_run_model(uri, run_id)
        log_overoptimisation_plot(uri, run_id, cfg)
        registered = register_model(uri, register, run_id) if register else None
    return TrainOutcome(
        run_name=name, mlflow_run_id=run_id, tracking_uri=uri,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}), model_uri=model_uri, registered=registered,
    )


def dry_run(cfg: RunConfig) -> list[str]:
    """`alignprop train --dry-run`: every check `launch` makes before Ray starts, then what the run would
    be (name, storage, MLflow run) and whether it would resume; starts nothing and writes nothing."""
    name, uri = run_name(cfg), resolved_tracking_uri(cfg)
    storage = resolve_storage_path(cfg.ray.storage_path)
    check_resume_safety(storage, name)
    address = preflight(cfg, storage, uri)
    experiment = cfg.tracking.experiment or cfg.name
    where = f"the cluster at {address}" if address else "a local Ray"
    return [f"[alignprop] dry run: config valid; would train {name} on {where} "
            f"({cfg.ray.num_workers} workers, {cfg.trainer.max_steps} steps)",
            f"  storage: {storage}/{name}", f"  {_mlflow_run_line(uri, experiment, name)}",
            f"  {_resume_line(storage, name)}", "  nothing was started or written"]


def _resume_line(storage: str, name: str) -> str:
    if "://" in storage:
        return f"resume: whatever checkpoint Ray has under {storage}/{name} (remote storage is not read here)"
    run_dir = Path(storage) / name
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    if not checkpoints:
        return "resume: no checkpoint yet: it would start at step 0"
    chosen, broken = newest_valid(checkpoints[-1])
    skipped = "".join(f"; {path.name} is incomplete ({why}): skipped" for path, why in broken)
    if chosen is None:
        return f"resume: no whole checkpoint{skipped}: it would start at step 0"
    import json

    step = json.loads((chosen / "trainer_state.json").read_text()).get("step", "?")
    return f"resume: it would resume from {chosen} (step {step}){skipped}"


def _mlflow_run_line(uri: str, experiment: str, name: str) -> str:
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return f"mlflow: {uri} (a new store; the run would be created)"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = "
                              f"{quote_filter_value(name)}", max_results=1) if found else []
    if not runs:
        return f"mlflow: {uri}, experiment {experiment!r}: a new run would be created"
    run = runs[0]
    return (f"mlflow: {uri}, experiment {experiment!r}: would continue run {run.info.run_id} "
            f"(now {run.info.status})")
