"""MLflow tracking: the driver opens (or re-opens) the run; rank 0 of the workers logs into it.

The driver resolves an absolute tracking URI (Ray workers and jobs run in other directories),
creates the experiment and the run (deterministic name, tagged so a rerun finds it again), logs the
flattened config, and hands `(uri, run_id)` to the workers. Workers log with `MlflowClient` and an
explicit run id, so no global "active run" state crosses process boundaries.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from alignprop.platform.errors import RunBusyError

RUN_NAME_TAG = "alignprop.run_name"
HEARTBEAT_TAG = "alignprop.heartbeat"  # unix time, refreshed by the driver while the run is alive
OWNER_TAG = "alignprop.owner"  # host:pid of the driver
HEARTBEAT_EVERY_S = 20.0
HEARTBEAT_LEASE_S = 90.0  # a RUNNING run whose heartbeat is older than this is taken over
LOCK_FILE = ".alignprop.lock"


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


def probe_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, on a tracking URI that cannot work (before Ray or a run starts)."""
    from alignprop.platform.config import ConfigError

    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as reply:
                ok = reply.status == 200
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"tracking.uri: cannot reach {uri} ({reason}); accepted: a running MLflow server "
                              "(make ui, or mlflow server --host 127.0.0.1 --port 5000) or sqlite:///path/mlflow.db") from None
        if not ok:
            raise ConfigError(f"tracking.uri: {uri}/health did not answer OK; accepted: a running MLflow server")
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise ConfigError(f"tracking.uri: {db.parent} is not a writable directory; accepted: sqlite:///<writable dir>/mlflow.db")


def quote_filter_value(value: str) -> str:
    """A string literal for an MLflow filter string (run names are restricted, but never trust them)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot quote {value!r} for an MLflow filter")


@contextmanager
def _sqlite_create_lock(uri: str):
    """Two processes creating a fresh sqlite store race on its schema: serialise through a lock on
    the database's directory (no extra file is left behind)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    fd = os.open(Path(uri[len("sqlite:///"):]).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _heartbeat_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _stale(run, now: float) -> Optional[str]:
    """None if a RUNNING run's heartbeat is fresh (someone is running it), else why it is stale."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    owner = run.data.tags.get(OWNER_TAG, "")
    if beat is None:
        return "no heartbeat"
    age = now - float(beat)
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return f"its process {owner} is gone"
    return None if age < HEARTBEAT_LEASE_S else f"last heartbeat {age:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], config_yaml: str,
             tags: Optional[dict[str, str]] = None) -> str:
    """Find the run tagged `run_name` in `experiment` (resume) or create it; returns its id.

    Refuses (RunBusyError) a run that is RUNNING with a fresh heartbeat: one run per name at a time.
    `tags` go on a new run (e.g. `mlflow.parentRunId` makes it a child in the MLflow UI)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    with _sqlite_create_lock(uri):  # creating the client creates (migrates) a fresh sqlite schema
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {quote_filter_value(run_name)}", max_results=1)
    beat = {HEARTBEAT_TAG: str(time.time()), OWNER_TAG: _heartbeat_owner()}
    if runs:
        run = runs[0]
        why = _stale(run, time.time()) if run.info.status == "RUNNING" else "not running"
        if why is None:
            raise RunBusyError(f"run {run_name!r} is already running (MLflow run {run.info.run_id}, process "
                               f"{run.data.tags.get(OWNER_TAG, '?')}); wait for it, stop it, or choose another tracking.run_name")
        client.update_run(run.info.run_id, status="RUNNING")
        for key, value in beat.items():
            client.set_tag(run.info.run_id, key, value)
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **beat, **(tags or {})})
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[start:start + 100], synchronous=True)
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], config_yaml: str,
                tags: Optional[dict[str, str]] = None):
    """Open (or re-open) the MLflow run, keep its heartbeat, and close it whatever happens:
    FINISHED, FAILED on an error, KILLED on Ctrl-C. Yields the run id."""
    from mlflow import MlflowClient

    run_id = open_run(uri, experiment, run_name, params, config_yaml, tags)
    client = MlflowClient(uri)  # made now: closing must not wait for a store to initialise
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(uri, run_id, stop), daemon=True, name="alignprop-heartbeat")
    beat.start()
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        stop.set()
        beat.join(timeout=2)  # a beat in flight may finish later: it only refreshes a tag
        client.set_terminated(run_id, status=status)


def _heartbeat(uri: str, run_id: str, stop: threading.Event) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    while not stop.wait(HEARTBEAT_EVERY_S):
        try:
            client.set_tag(run_id, HEARTBEAT_TAG, str(time.time()))
        except Exception:  # a busy tracking server: the next beat retries; the lease is several beats long
            pass


@contextmanager
def run_lock(storage_path: str, name: str):
    """One process per run name at a time: an exclusive lock on `<storage>/<name>/.alignprop.lock`
    (released by the kernel if the process dies, so a crash never blocks a rerun). Remote storage
    (s3://, gs://) has no lock; the MLflow heartbeat check covers it."""
    if "://" in storage_path:
        yield
        return
    import fcntl
    import json

    folder = Path(storage_path) / name
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunBusyError(f"run {name!r} is already running ({holder}, lock {folder / LOCK_FILE}); "
                               "wait for it, stop it, or choose another tracking.run_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"owner": _heartbeat_owner(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class Tracker:
    """The rank-0 logging helper: every method is a no-op on other ranks or without a run."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], enabled: bool):
        self.run_id = run_id
        self.enabled = bool(enabled and uri and run_id)
        self.client = None
        self.logged_through = -1  # steps up to this one are already in the run: never log them twice
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)
            self.logged_through = last_logged_step(self.client, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-step metrics, once per step: a resumed run replays the steps after its checkpoint
        (deterministically: same values), and the replay of steps already logged is not logged."""
        if not self.enabled or step <= self.logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_image(self, images: torch.Tensor, key: str, step: int) -> None:
        """Log a B×3×H×W [0, 1] batch as one grid image (MLflow's step-indexed image log)."""
        if self.enabled and step > self.logged_through:
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


def last_logged_step(client, run_id: str) -> int:
    """The last step with metrics in the run: -1 if none, 0 if only the base model's evaluation."""
    metrics = client.get_run(run_id).data.metrics
    return int(metrics["step"]) if "step" in metrics else (0 if metrics else -1)


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
