"""Reliability and security of a run's lifecycle, through the real CLI:
unreachable services fail fast in one line, one run per name at a time, Ctrl-C ends the run KILLED
with no Ray left behind, a resumed run logs every step once, a local Ray listens on loopback only,
and planted pickles in a checkpoint are refused before anything starts."""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from alignprop.trainers.checkpoint_integrity import verify_checkpoint
from conftest import subprocess_env

CLI = [sys.executable, "-m", "alignprop.platform.cli"]


def cli(*args: str, cwd: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alignprop: error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


@pytest.mark.parametrize("override, field, reason", [
    ("ray.address=127.0.0.1:1", "ray.address", "cannot reach"),
    ("tracking.uri=http://127.0.0.1:1", "tracking.uri", "cannot reach"),
    ("ray.use_gpu=true", "ray.num_workers/ray.resources_per_worker", "need GPU"),
])
def test_unreachable_or_unsatisfiable_targets_fail_fast_writing_nothing(tmp_path, override, field, reason):
    start = time.monotonic()
    proc = cli("train", "--config", "tiny-cpu", override, cwd=tmp_path)
    line = one_line_error(proc)
    assert line.startswith(f"alignprop: error: {field}: ") and reason in line and "accepted" in line, line
    assert time.monotonic() - start < 90, "a probe with a short timeout, not a hang"
    assert list(tmp_path.iterdir()) == [], "nothing written: no mlflow.db, no ray_results"


def _pickle_bomb(path: Path, marker: Path) -> None:
    import pickle

    class Bomb:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"module": Bomb()}))


def test_a_planted_pickle_in_a_checkpoint_is_refused_before_anything_starts(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "ray" / "planted" / "checkpoint_2026-11-26_00-00-00.000000"
    (checkpoint).mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 2}')
    _pickle_bomb(checkpoint / "engine" / "mp_rank_00_model_states.pt", marker)
    proc = cli("train", "--config", "tiny-cpu", "--run-name", "planted", f"ray.storage_path={tmp_path}/ray",
               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    line = one_line_error(proc)
    assert "mp_rank_00_model_states.pt" in line, line
    assert not marker.exists(), "the pickle was never loaded"
    assert not (tmp_path / "mlflow.db").exists(), "refused before the MLflow run was opened"


def _open_run_in_fresh_db(uri: str, name: str, barrier) -> None:
    from alignprop.platform.tracking import open_run

    barrier.wait()
    open_run(uri, "race", name, {"a": 1}, "name: race\n")


def test_two_processes_creating_a_fresh_sqlite_store_do_not_race(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [ctx.Process(target=_open_run_in_fresh_db, args=(uri, f"run{i}", barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]


# ------------------------------------------------------------------------------- one real run
def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)  # polling an external condition, with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def _last_step(uri: str, run_name: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-cpu")
    if experiment is None:
        return -1
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`alignprop.run_name` = '{run_name}'")
    return int(runs[0].data.metrics.get("step", -1)) if runs else -1


def _ray_processes(ray_tmp: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + str((proc.info["environ"] or {}).get("RAY_TMPDIR", ""))
        except (psutil.Error, TypeError):
            continue
        if ray_tmp in text and proc.pid != os.getpid():
            found.append(proc)
    return found


def _listening(processes: list[psutil.Process]) -> list[tuple[int, str, str]]:
    pids = {p.pid: p for p in processes}
    rows = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            rows.append((conn.pid, pids[conn.pid].name(), f"{conn.laddr.ip}:{conn.laddr.port}"))
    return rows


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1: a dual-stack socket bound to IPv4 loopback
    return address.is_loopback


@pytest.mark.slow
def test_run_lifecycle_lock_loopback_ctrl_c_and_lossless_resume(tmp_path):
    """One real run through every stage a user meets: loopback-only Ray, the run lock, Ctrl-C (KILLED, no
    Ray left), then a rerun after the disk lost the newest checkpoint's tail: one line names the broken
    checkpoint, it resumes from the previous one and logs every step exactly once."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["train", "--config", "tiny-cpu", "--run-name", "life", "--tracking-uri", uri,
              f"ray.storage_path={tmp_path}/ray",
              "ray.num_workers=2", "trainer.ckpt_every=2", "trainer.eval_every=0", "sampling.num_steps=4",
              "truncation.k=2"]
    env = subprocess_env(RAY_TMPDIR=ray_tmp)
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe nobody drains: a full pipe blocks the writer
    # As from a terminal: SIGINT at its default even when this test runs as a background job
    # (non-interactive shells start `cmd &` with SIGINT ignored, and the ignore is inherited).
    first = subprocess.Popen([*CLI, *common, "trainer.max_steps=500"], cwd=tmp_path, env=env, text=True,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(lambda: _last_step(uri, "life") >= 5, 300, "step 5 in MLflow", first)  # checkpoints 2 and 4

        # A local Ray of our own: every listening socket of its processes is on loopback.
        sockets = _listening(_ray_processes(ray_tmp) + [psutil.Process(first.pid)])
        assert len(sockets) >= 5, sockets
        exposed = [row for row in sockets if not _is_loopback(row[2].rsplit(":", 1)[0])]
        assert not exposed, exposed

        # A second run with the same name is refused, naming the first; the first keeps running.
        second = cli(*common, "trainer.max_steps=500", cwd=tmp_path, RAY_TMPDIR=ray_tmp)
        line = one_line_error(second)
        assert "already running" in line and str(first.pid) in line, line
        assert first.poll() is None

        # Ctrl-C (to the whole process group, as a terminal sends it) stops within seconds.
        interrupted_at = time.monotonic()
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=120)  # about 1 s on an idle machine; generous for a loaded CI
        assert time.monotonic() - interrupted_at < 120
        assert first.returncode == 130, (tmp_path / "first.log").read_text()[-4000:]
        assert "alignprop: interrupted; the MLflow run is marked KILLED" in (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])[0]
    assert run.info.status == "KILLED"
    _wait_for(lambda: not _ray_processes(ray_tmp), 30, "Ray processes to exit")
    logged = _last_step(uri, "life")

    # The disk filled mid-copy of the newest checkpoint: its optimizer state is cut to 100 bytes.
    checkpoints = sorted(p for p in (tmp_path / "ray" / "life").glob("checkpoint_*") if p.is_dir())  # not Ray's json
    checkpoints = [p for p in checkpoints if verify_checkpoint(p) is None]  # Ctrl-C may have cut one short itself
    assert len(checkpoints) >= 2, checkpoints
    checkpoints = checkpoints[-2:]
    latest = checkpoints[-1] / "optimizer.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])

    # Rerun: resumes from the previous checkpoint (before `logged`), replays, and logs each step once.
    final = cli(*common, f"trainer.max_steps={logged + 2}", cwd=tmp_path, timeout=600, RAY_TMPDIR=ray_tmp)
    assert final.returncode == 0, final.stderr[-4000:]
    out = final.stdout + final.stderr
    assert f"checkpoint {checkpoints[-1]} is incomplete (optimizer.safetensors: 100 of " in out, out[-3000:]
    assert f"resuming from {checkpoints[0]}" in out and "resumed at step" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, logged + 3)), steps
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_mlflow_heartbeat_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    """The storage lock covers one machine; the MLflow heartbeat covers drivers anywhere that share
    a tracking server (and remote storage, where there is no lock file)."""
    import socket

    from mlflow import MlflowClient

    from alignprop.platform.errors import RunBusyError
    from alignprop.platform.tracking import HEARTBEAT_TAG, OWNER_TAG, open_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = open_run(uri, "beat", "same-name", {}, "name: beat\n")
    with pytest.raises(RunBusyError,
                       match=r"^run 'same-name' is already running \(MLflow run .*or choose another tracking.run_name"):
        open_run(uri, "beat", "same-name", {}, "name: beat\n")  # RUNNING, fresh heartbeat, live owner (us)

    gone = subprocess.Popen(["true"])
    gone.wait()
    client.set_tag(run_id, OWNER_TAG, f"{socket.gethostname()}:{gone.pid}")
    assert open_run(uri, "beat", "same-name", {}, "name: beat\n") == run_id, "a crashed driver on this host: taken over"

    client.set_tag(run_id, OWNER_TAG, "another-host:1")
    client.set_tag(run_id, HEARTBEAT_TAG, str(time.time() - 3600))
    taken_over = open_run(uri, "beat", "same-name", {}, "name: beat\n")
    assert taken_over == run_id, "a heartbeat older than the lease: taken over"
    client.set_terminated(run_id, status="FINISHED")
    assert open_run(uri, "beat", "same-name", {}, "name: beat\n") == run_id, "a finished run resumes"
