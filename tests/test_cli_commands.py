"""The CLI's self-description, run as a user types it: `alignprop presets` (one line each),
`alignprop config PRESET [overrides]` (the resolved YAML, which loads back to the same config) and
`alignprop --version`; `alignprop train --dry-run` (checked and described, nothing started)."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from alignprop.platform.config import load_config, run_name, to_yaml
from alignprop.platform.presets import PRESET_DIR
from conftest import REPO, VENV_BIN, subprocess_env


def alignprop(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "alignprop"), *args], capture_output=True, text=True, env=subprocess_env(),
                          cwd=cwd, timeout=300)


def test_presets_lists_each_shipped_preset_with_what_it_is():
    proc = alignprop("presets")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = [line.split(None, 1) for line in proc.stdout.splitlines()]
    assert [name for name, _ in rows] == sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    for name, description in rows:
        assert 10 < len(description) <= 100, (name, description)
    assert dict(rows)["sd15-aesthetic-ddpo"].startswith("DDPO (Black et al. 2023), aesthetic task")


def test_config_prints_the_resolved_yaml_and_it_loads_back_to_the_same_config(tmp_path):
    proc = alignprop("config", "tiny-cpu", "optim.lr=0.5", "truncation.k=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "resolved.yaml").write_text(proc.stdout)
    expected = load_config("tiny-cpu", ["optim.lr=0.5", "truncation.k=3"])
    assert to_yaml(load_config(str(tmp_path / "resolved.yaml"))) == to_yaml(expected) == proc.stdout
    bad = alignprop("config", "tiny-cpu", "optim.lr=abc", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "alignprop: error: optim.lr: got 'abc'; accepted: a float"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolved.yaml"], "config writes nothing"


def test_version_is_the_installed_package_version():
    proc = alignprop("--version")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout.strip() == f"alignprop {version}"


def test_train_dry_run_describes_the_run_and_starts_nothing(tmp_path, monkeypatch):
    import ray

    from test_cli_errors import run_cli

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    overrides = [f"ray.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = run_cli(["train", "--config", "tiny-cpu", "--dry-run", *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr
    name = run_name(load_config("tiny-cpu", overrides))
    assert f"would train {name} on a local Ray (2 workers, " in proc.stdout, proc.stdout
    assert "a new store; the run would be created" in proc.stdout
    assert "resume: no checkpoint yet: it would start at step 0" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "a dry run writes nothing"
    bad = run_cli(["train", "--config", "tiny-cpu", "--dry-run", "ray.num_workers=4000",
                   "ray.resources_per_worker={CPU: 0.0001}", *overrides], tmp_path)
    assert bad.returncode == 2 and "ray.num_workers: 4000 workers need at least " in bad.stderr


def test_runs_show_names_an_unknown_run_or_a_missing_store_in_one_line(tmp_path):
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").create_experiment("x")
    proc = alignprop("runs", "show", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("alignprop: error: run: no run named or with id 'nope' at sqlite:///"), \
        proc.stderr
    proc = alignprop("runs", "show", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert proc.returncode == 2 and "--tracking-uri: no MLflow store at" in proc.stderr
    assert not (tmp_path / "none.db").exists()


def test_each_subcommands_help_shows_only_its_own_options():
    import argparse
    import re

    from alignprop.platform.cli import _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in sub.choices.items():
        own = {option for action in parser._actions for option in action.option_strings}
        shown = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", parser.format_help()))
        assert shown <= own, (name, shown - own)
    proc = alignprop("train", "--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--space" not in proc.stdout, proc.stdout
