"""`alignprop runs show RUN`: a run's closing summary again, from MLflow alone (no UI, no Ray).

    alignprop runs show tiny-cpu-02f14d19                      # an alignprop run name (the newest such run)
    alignprop runs show 0123abcd...                            # or an MLflow run id
    alignprop runs show e2e --tracking-uri sqlite:///$PWD/mlflow.db

The lines are `alignprop train`'s closing summary (launch/summary.py) rebuilt from what the run logged:
its config.yaml, metrics, LoRA and Model artifacts, registered versions; the checkpoint line is the
newest whole checkpoint under the run's `ray.storage_path`, read from this machine.
"""

from __future__ import annotations

import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import yaml

from ...trainers.checkpoint_integrity import newest_valid
from ..config import ConfigError, RunConfig, from_dict
from ..mlflow_model import run_model
from ..tracking import RUN_NAME_TAG, quote_filter_value
from .session import resolve_storage_path
from .summary import closing_summary
from .train import TrainOutcome


def show_run(tracking_uri: str, ref: str) -> list[str]:
    """The summary lines of run `ref` (an MLflow run id or an alignprop run name) at `tracking_uri`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = find_run(client, ref, tracking_uri)
    run_id = run.info.run_id
    cfg = logged_config(client, run_id)
    name = run.data.tags.get(RUN_NAME_TAG, run.info.run_name)
    model_uri = f"runs:/{run_id}/model" if run_model(client, run_id) is not None else None
    versions = sorted(client.search_model_versions(f"run_id = '{run_id}'"), key=lambda v: int(v.version))
    registered = f"models:/{versions[-1].name}/{versions[-1].version}" if versions else None
    checkpoint = newest_checkpoint(cfg.ray.storage_path, name) if cfg is not None else None
    outcome = TrainOutcome(name, run_id, tracking_uri, str(checkpoint) if checkpoint else "none found here",
                           dict(run.data.metrics), model_uri, registered)
    ended = (datetime.fromtimestamp(run.info.end_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
             if run.info.end_time else "not ended")
    return [f"[alignprop] run {name}: {run.info.status}, ended {ended}"] + closing_summary(outcome, model_uri,
                                                                                          registered, cfg)


def find_run(client, ref: str, tracking_uri: str):
    """The run with MLflow id `ref`, else the newest run tagged with alignprop run name `ref`."""
    from mlflow.exceptions import MlflowException

    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = {quote_filter_value(ref)}",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        raise ConfigError(f"run: no run named or with id {ref!r} at {tracking_uri}; accepted: an alignprop run name "
                          "or an MLflow run id of that store (--tracking-uri or MLFLOW_TRACKING_URI)")
    return runs[0]


def logged_config(client, run_id: str) -> Optional[RunConfig]:
    """The run's config.yaml artifact as a RunConfig (plain YAML, no code), or None if it has none."""
    if "config.yaml" not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return from_dict(yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()))


def newest_checkpoint(storage_path: Optional[str], name: str) -> Optional[Path]:
    """The newest whole checkpoint of run `name` in local storage, or None (none, or remote storage)."""
    storage = resolve_storage_path(storage_path)
    if "://" in storage:
        return None
    checkpoints = sorted(p for p in (Path(storage) / name).glob("checkpoint_*") if p.is_dir())
    return newest_valid(checkpoints[-1])[0] if checkpoints else None
