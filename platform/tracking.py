"""MLflow tracking: the driver opens (or re-opens) the run; rank 0 of the workers logs into it.

The driver resolves an absolute tracking URI (Ray workers and jobs run in other directories),
creates the experiment and the run (deterministic name, tagged so a rerun finds it again), logs the
flattened config, and hands `(uri, run_id)` to the workers. Workers log with `MlflowClient` and an
explicit run id, so no global "active run" state crosses process boundaries.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

RUN_NAME_TAG = "alignprop.run_name"


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """None → sqlite:///<cwd>/mlflow.db; relative sqlite/file paths → absolute."""
    if uri is None:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        return Path(path).expanduser().resolve().as_uri()
    return uri


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], config_yaml: str,
             tags: Optional[dict[str, str]] = None) -> str:
    """Find the run tagged `run_name` in `experiment` (resume) or create it; returns its id.

    `tags` go on a new run (e.g. `mlflow.parentRunId` makes it a child in the MLflow UI)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[start:start + 100], synchronous=True)
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id


@contextmanager
def run_status(uri: str, run_id: str):
    """Marks the MLflow run FINISHED when the block ends, FAILED if it raises (then re-raises)."""
    from mlflow import MlflowClient

    try:
        yield
    except BaseException:
        MlflowClient(uri).set_terminated(run_id, status="FAILED")
        raise
    MlflowClient(uri).set_terminated(run_id, status="FINISHED")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class Tracker:
    """The rank-0 logging helper: every method is a no-op on other ranks or without a run."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], enabled: bool):
        self.run_id = run_id
        self.enabled = bool(enabled and uri and run_id)
        self.client = None
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_image(self, images: torch.Tensor, key: str, step: int) -> None:
        """Log a B×3×H×W [0, 1] batch as one grid image (MLflow's step-indexed image log)."""
        if self.enabled:
            self.client.log_image(self.run_id, image_grid(images), key=key, step=step)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_lora(self, save_fn, artifact_path: str) -> None:
        """`save_fn(dir)` writes the adapter; it lands under `artifact_path` in the run."""
        if self.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                save_fn(tmp)
                self.log_artifacts(tmp, artifact_path)


def image_grid(images: torch.Tensor, columns: int = 4) -> np.ndarray:
    """B×3×H×W in [0, 1] → H'×W'×3 uint8 grid (no torchvision needed)."""
    images = images.detach().float().clamp(0, 1).cpu()
    b, c, h, w = images.shape
    columns = min(columns, b)
    rows = -(-b // columns)
    grid = torch.zeros(c, rows * h, columns * w)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
