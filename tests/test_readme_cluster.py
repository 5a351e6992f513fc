"""README's local-cluster block, run verbatim: extracted from README.md and run by bash in a copy of
the repo with a fresh HOME (no Ray token yet) and a PATH without the venv, so token generation,
venv activation, `ray start --head`, `ray job submit ... alignprop train` and `ray stop` are the
user's own commands. Where the kernel allows it, the block runs in its own PID namespace: its
`ray stop` then sees only the Ray it started, and nothing outlives it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "ray_results",
                                     "__pycache__", "*.egg-info", ".pytest_cache")


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def own_pid_namespace() -> list[str]:
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
    try:
        return probe[:-1] if subprocess.run(probe, capture_output=True, timeout=10).returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


def fresh_user_env(home: Path) -> dict[str, str]:
    """What a new shell on a fresh machine has: no venv on PATH, no Ray/MLflow settings, no token."""
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    if "TORCH_EXTENSIONS_DIR" in os.environ:  # the DeepSpeed op built once per venv (Makefile)
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def test_readme_local_cluster_block_runs_as_written(tmp_path):
    block = readme_block("## On a Ray cluster")
    assert "ray start --head" in block and "ray job submit" in block and "ray stop" in block
    work, home = tmp_path / "repo", tmp_path / "home"
    shutil.copytree(REPO, work, ignore=COPY_IGNORE)
    (work / ".venv").symlink_to(REPO / ".venv")  # ignored by .gitignore, so not uploaded with the job
    home.mkdir()
    wrapper = own_pid_namespace()
    proc = subprocess.run([*wrapper, "bash", "-euo", "pipefail", "-c", block], cwd=work, env=fresh_user_env(home),
                          capture_output=True, text=True, timeout=900)
    if not wrapper:  # a failed block may leave its head behind
        subprocess.run([str(REPO / ".venv/bin/ray"), "stop", "--force"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    assert (home / ".ray" / "auth_token").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward/total_mean")]
    assert steps == list(range(1, len(steps) + 1)) and steps, steps
    assert any((work / "ray_results").iterdir())
