"""`ray job submit --working-dir . -- alignprop tune ...` against a `ray start --head` cluster that
this test starts (own temp dir and ports, 127.0.0.1) and stops (its processes only). A training
job on a cluster is README's local-cluster block, run verbatim by tests/test_readme_cluster.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import REPO, VENV_BIN, free_port, subprocess_env

pytestmark = pytest.mark.slow


def _cluster_pids(temp_dir: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if temp_dir in line]


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length cap
    dashboard = f"http://127.0.0.1:{(dash_port := free_port())}"
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash_port), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=subprocess_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard], env=subprocess_env(),
                         capture_output=True).returncode != 0:
        assert head.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the Ray dashboard did not come up in 120 s"
        time.sleep(1)  # polling a readiness condition, not waiting for a guess
    yield dashboard
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    for pid in _cluster_pids(temp_dir):  # anything that left the process group
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep_on_the_cluster(ray_head, tmp_path):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
         "alignprop", "tune", "--config", "tiny-cpu", "--space", "tune_spaces/tiny-smoke.yaml", "--num-samples", "2",
         "--max-concurrent", "1", "ray.num_workers=1", "ray.resources_per_worker={CPU: 0.9}", "trainer.max_steps=1",
         f"tracking.uri=sqlite:///{db}", f"ray.storage_path={tmp_path / 'ray'}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "[tune] 2/2 trial" in proc.stdout
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert len(runs) == 3 and sum("mlflow.parentRunId" in r.data.tags for r in runs) == 2
