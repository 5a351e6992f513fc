"""Sweep space files: every shipped space validates; bad spaces are one-line errors before Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignprop.platform.config import ConfigError, load_config
from alignprop.platform.sweep_space import apply_params, list_spaces, load_space
from conftest import subprocess_env

SPACE_CONFIG = {"reward_weights": "sd15-aesthetic+hps"}


@pytest.mark.parametrize("name", list_spaces())
def test_every_shipped_space_validates(name):
    cfg = load_config(SPACE_CONFIG.get(name, "tiny-cpu"))
    spec = load_space(name, cfg)
    assert spec.space and spec.mode in ("max", "min")
    assert load_space(f"tune_spaces/{name}.yaml", cfg).space == spec.space


def test_apply_params_sets_paths_and_reward_weights():
    cfg = apply_params(load_config("sd15-aesthetic+hps"), {"optim.lr": 0.01, "rewards.hpsv2.weight": 0.25, "truncation.low": 3})
    assert cfg.optim.lr == 0.01 and cfg.truncation.low == 3
    assert [r["weight"] for r in cfg.rewards] == [1.0, 0.25]


BAD = [
    ("space: {optim.lrr: {space: loguniform, lower: 1.0e-4, upper: 1.0e-2}}", "space.optim.lrr: unknown config path"),
    ("space: {optim.lr: {space: loguniform, lower: 0.1, upper: 0.01}}", "space.optim.lr: lower (0.1) must be < upper (0.01)"),
    ("space: {optim.lr: {space: loguniform, lower: 0, upper: 1}}", "space.optim.lr: loguniform needs lower > 0"),
    ("space: {optim.lr: {space: normal, mean: 0}}", "space.optim.lr: got"),
    ("space: {truncation.k: {space: randint, lower: 1, upper: 50}}", "space.truncation.k: value 49 makes the config invalid"),
    ("space: {truncation.strategy: {space: choice, categories: [fixed, linear]}}", "space.truncation.strategy: value 'linear'"),
    ("space: {rewards.aesthetic.weight: {space: uniform, lower: 0, upper: 1}}", "space.rewards.aesthetic.weight: unknown config path"),
    ("space: {optim.lr: {space: choice, categories: []}}", "space.optim.lr: categories must be a non-empty list"),
    ("mode: maximum\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "mode: got 'maximum'; accepted: max, min"),
    ("scheduler: hyperband\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "scheduler: got 'hyperband'; accepted: asha, none"),
    ("searcher: optuna\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "k.yaml: unknown key 'searcher'"),
    ("metric: accuracy\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "metric: got 'accuracy'"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_spaces_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "k.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_space(str(tmp_path / "k.yaml"), load_config("tiny-cpu"))
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)


def test_tune_cli_rejects_a_bad_space_before_ray_starts(tmp_path):
    (tmp_path / "bad.yaml").write_text("space: {truncation.k: {space: randint, lower: 1, upper: 99}}")
    proc = subprocess.run([sys.executable, "-m", "alignprop.platform.cli", "tune", "--config", "tiny-cpu", "--space",
                           str(tmp_path / "bad.yaml"), f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("alignprop: error: space.truncation.k: value 98")
    assert not (tmp_path / "m.db").exists()


def test_optuna_search_and_asha_scheduler_build():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from alignprop.platform.tune import _scheduler, _search

    spec = load_space("reward_weights", load_config("sd15-aesthetic+hps"))
    assert isinstance(_search(spec), OptunaSearch)
    assert isinstance(_scheduler(spec, 100), ASHAScheduler)
    assert load_space("k_lr", load_config("tiny-cpu")).num_trials(8) == 8
