"""The driver's MLflow runs: an absolute tracking URI probed before anything starts, the experiment (tagged
to open in the UI's model-training view) and the run (deterministic name, a heartbeat while it is
alive, MLflow's user/source/git tags), opened or re-opened and always closed; and the run lock in
storage that keeps one process per run name.

    with tracked_run(uri, experiment, name, params, config_yaml) as run_id:
        ...   # FINISHED, FAILED on an error, KILLED on Ctrl-C
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError, RunBusyError
from .datasets import PromptSet, log_prompt_sets

RUN_NAME_TAG = "alignprop.run_name"
HEARTBEAT_TAG = "alignprop.heartbeat"  # unix time, refreshed by the driver while the run is alive
OWNER_TAG = "alignprop.owner"  # host:pid of the driver
COMMAND_TAG = "alignprop.command"  # the command line that started the run
HEARTBEAT_EVERY_S = 20.0
HEARTBEAT_LEASE_S = 90.0  # a RUNNING run whose heartbeat is older than this is taken over
LOCK_FILE = ".alignprop.lock"
# Read by the MLflow UI (3.x) to pick an experiment's view; "custom_model_development" is its
# "Machine learning" (model-training) kind, vs "genai_development". MLflow 3.17's UI follows its own
# sidebar switch instead (a browser setting, GenAI on a first visit; `?workflowType=machine_learning`
# in the URL selects it), so the tag is what we can record, not a guarantee of the view.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


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
    if uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ConfigError(f"tracking.uri: got {uri} (a file store, which MLflow 3 keeps in maintenance mode and "
                          "refuses); accepted: sqlite:///abs/path/mlflow.db, an http(s):// MLflow server, or "
                          "MLFLOW_ALLOW_FILE_STORE=true to use the file store anyway")
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as reply:
                ok = reply.status == 200
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"tracking.uri: cannot reach {uri} ({reason}); accepted: a running MLflow server "
                              "(make ui, or mlflow server --host 127.0.0.1 --port 5000) "
                              "or sqlite:///path/mlflow.db") from None
        if not ok:
            raise ConfigError(f"tracking.uri: {uri}/health did not answer OK; accepted: a running MLflow server")
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise ConfigError(f"tracking.uri: {db.parent} is not a writable directory; accepted: sqlite:///<writable "
                              "dir>/mlflow.db")


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
             tags: Optional[dict[str, str]] = None, datasets: Sequence["PromptSet"] = ()) -> str:
    """Find the run tagged `run_name` in `experiment` (resume) or create it; returns its id.

    Refuses (RunBusyError) a run that is RUNNING with a fresh heartbeat: one run per name at a time.
    A new run gets MLflow's user/source/git tags (`run_context_tags`) and `tags` (e.g.
    `mlflow.parentRunId` makes it a child in the MLflow UI). `datasets` are logged as the run's
    dataset inputs, each (name, digest, context) once however often the run is reopened."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    with _sqlite_create_lock(uri):  # creating the client creates (migrates) a fresh sqlite schema
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        else:
            experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older alignprop or by hand: never overwrite a choice
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {quote_filter_value(run_name)}",
                              max_results=1)
    beat = {HEARTBEAT_TAG: str(time.time()), OWNER_TAG: _heartbeat_owner()}
    if runs:
        run = runs[0]
        why = _stale(run, time.time()) if run.info.status == "RUNNING" else "not running"
        if why is None:
            raise RunBusyError(f"run {run_name!r} is already running (MLflow run {run.info.run_id}, process "
                               f"{run.data.tags.get(OWNER_TAG, '?')}); wait for it, stop it, or choose another "
                               "tracking.run_name")
        client.update_run(run.info.run_id, status="RUNNING")
        for key, value in beat.items():
            client.set_tag(run.info.run_id, key, value)
        log_prompt_sets(client, run.info.run_id, datasets)
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, **run_context_tags(), **beat, **(tags or {})})
    run_id = run.info.run_id
    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[start:start + 100], synchronous=True)
    client.log_text(run_id, config_yaml, "config.yaml")
    log_prompt_sets(client, run_id, datasets)
    return run_id


def run_context_tags() -> dict[str, str]:
    """MLflow's standard run tags, which `MlflowClient.create_run` (unlike `mlflow.start_run`) does
    not add: who started the run (`mlflow.user`, the UI's "Created by"), from what
    (`mlflow.source.name`: `alignprop train`, else the program's name — the UI shows the part after
    the last "/", so never a whole command line), the command itself (`alignprop.command`), and the
    commit of this code when it runs from a git checkout (a wheel install or a `ray job submit`
    copy has none: no tag)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    argv = sys.argv or [""]
    program = Path(argv[0]).name or "<console>"
    source = f"{program} {argv[1]}" if program == "alignprop" and len(argv) > 1 else program
    command = shlex.join([program, *argv[1:]])
    tags = {MLFLOW_USER: _user(), MLFLOW_SOURCE_NAME: source, MLFLOW_SOURCE_TYPE: "LOCAL",
            COMMAND_TAG: command if len(command) <= 5000 else command[:4997] + "..."}
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def _user() -> str:
    try:  # MLflow's own order: the tracking username, else the login name
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        return "unknown"


def git_commit(directory: Path, timeout_s: float = 5.0) -> Optional[str]:
    """HEAD of the git checkout `directory` is tracked in; None when it is not in one (or it is an
    ignored path inside one, e.g. a venv's site-packages), when git is missing or slow."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                                  timeout=timeout_s)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "--", Path(__file__).name) is None:
        return None
    commit = git("rev-parse", "HEAD")
    return commit if commit and len(commit) >= 40 and all(c in "0123456789abcdef" for c in commit) else None


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], config_yaml: str,
                tags: Optional[dict[str, str]] = None, datasets: Sequence[PromptSet] = ()):
    """Open (or re-open) the MLflow run, keep its heartbeat, and close it whatever happens:
    FINISHED, FAILED on an error, KILLED on Ctrl-C. Yields the run id."""
    from mlflow import MlflowClient

    run_id = open_run(uri, experiment, run_name, params, config_yaml, tags, datasets)
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
        os.pwrite(fd, json.dumps({"owner": _heartbeat_owner(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(),
                  0)
        yield
    finally:
        os.close(fd)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
