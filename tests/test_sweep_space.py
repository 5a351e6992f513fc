"""Sweep space files: every shipped space validates; bad spaces are one-line errors before Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

import alignprop.platform.sweeps.space as sweep_space
from alignprop.platform.config import ConfigError, load_config
from alignprop.platform.sweeps.space import apply_params, list_spaces, load_space
from conftest import subprocess_env

SPACE_CONFIG = {"reward_weights": "sd15-aesthetic+hps"}


def base_config(name: str):
    """sd15 presets name reward weights that live on a GPU cluster: skip the local path checks."""
    return load_config(name, paths=False)


@pytest.mark.parametrize("name", list_spaces())
def test_every_shipped_space_validates(name):
    cfg = base_config(SPACE_CONFIG.get(name, "tiny-cpu"))
    spec = load_space(name, cfg)
    assert spec.space and spec.mode in ("max", "min")
    assert load_space(f"tune_spaces/{name}.yaml", cfg).space == spec.space


def test_apply_params_sets_paths_and_reward_weights():
    cfg = apply_params(base_config("sd15-aesthetic+hps"),
                       {"optim.lr": 0.01, "rewards.hpsv2.weight": 0.25, "truncation.low": 3})
    assert cfg.optim.lr == 0.01 and cfg.truncation.low == 3
    assert [r["weight"] for r in cfg.rewards] == [1.0, 0.25]


BAD = [
    ("space: {optim.lrr: {space: loguniform, lower: 1.0e-4, upper: 1.0e-2}}", "space.optim.lrr: unknown config path"),
    ("space: {optim.lr: {space: loguniform, lower: 0.1, upper: 0.01}}",
     "space.optim.lr: lower (0.1) must be < upper (0.01)"),
    ("space: {optim.lr: {space: loguniform, lower: 0, upper: 1}}", "space.optim.lr: loguniform needs lower > 0"),
    ("space: {optim.lr: {space: normal, mean: 0}}", "space.optim.lr: got"),
    ("space: {truncation.k: {space: randint, lower: 1, upper: 50}}",
     "space.truncation.k: value 49 makes the config invalid"),
    ("space: {truncation.strategy: {space: choice, categories: [fixed, linear]}}",
     "space.truncation.strategy: value 'linear'"),
    ("space: {rewards.aesthetic.weight: {space: uniform, lower: 0, upper: 1}}",
     "space.rewards.aesthetic.weight: unknown config path"),
    ("space: {optim.lr: {space: choice, categories: []}}", "space.optim.lr: categories must be a non-empty list"),
    ("mode: maximum\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}",
     "mode: got 'maximum'; accepted: max, min"),
    ("scheduler: hyperband\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}",
     "scheduler: got 'hyperband'; accepted: asha, none"),
    ("searcher: optuna\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "k.yaml: unknown key 'searcher'"),
    ("metric: accuracy\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "metric: got 'accuracy'"),
    # the file itself: never a traceback, always the file and what it must hold
    ("space: {optim.lr: [", "k.yaml: not valid YAML (line 1, column 20"),
    ("", "k.yaml: empty file"),
    ("# only a comment\n", "k.yaml: empty file"),
    ("- optim.lr\n- truncation.k", "k.yaml: got a list at the top level"),
    ("mode: max", "space: missing in k.yaml"),
    ("space:", "space: got null in k.yaml"),
    ("space: [optim.lr]", "space: got a list in k.yaml"),
    ("space: {optim.lr: [0.1, 0.2]}", "space.optim.lr: got [0.1, 0.2] in k.yaml; accepted: a mapping {space:"),
    ("space: {optim.lr: 0.1}", "space.optim.lr: got 0.1 in k.yaml"),
    ("space: {optim.lr: {space: [uniform]}}", "space.optim.lr: got {'space': ['uniform']} in k.yaml"),
    ("metric: [eval/reward_total]\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}",
     "metric: got ['eval/reward_total']"),
    ("seed: x\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "seed: got 'x'; accepted: an integer"),
    ("grace_period: true\nspace: {optim.lr: {space: uniform, lower: 0.1, upper: 0.2}}", "grace_period: got True"),
    # the field's type: float distributions on integer fields, wrong category types
    ("space: {truncation.k: {space: uniform, lower: 1, upper: 5}}",
     "space.truncation.k: uniform samples floats but truncation.k is an integer; accepted: randint, or "
     "choice/grid_search of integers"),
    ("space: {truncation.k: {space: loguniform, lower: 1, upper: 5}}", "space.truncation.k: loguniform samples floats"),
    ("space: {sampling.num_steps: {space: quniform, lower: 2, upper: 8, q: 2}}",
     "space.sampling.num_steps: quniform samples floats"),
    ("space: {truncation.k: {space: choice, categories: [2, 2.5]}}",
     "space.truncation.k: categories holds 2.5 (float) but truncation.k is an integer"),
    ("space: {truncation.k: {space: grid_search, values: [2, true]}}", "space.truncation.k: values holds True (bool)"),
    ("space: {sampling.checkpoint_vae: {space: randint, lower: 0, upper: 2}}",
     "space.sampling.checkpoint_vae: randint samples integers but sampling.checkpoint_vae is true/false; accepted: "
     "choice/grid_search of true, false"),
    ("space: {sampling.checkpoint_vae: {space: choice, categories: [true, 0]}}",
     "space.sampling.checkpoint_vae: categories holds 0 (int)"),
    ("space: {truncation.strategy: {space: choice, categories: [fixed, 1]}}",
     "space.truncation.strategy: categories holds 1 (int) but truncation.strategy is a string; accepted: "
     "choice/grid_search of strings"),
    ("space: {truncation.strategy: {space: uniform, lower: 0, upper: 1}}",
     "space.truncation.strategy: uniform samples floats but truncation.strategy is a string"),
    ("space: {optim.lr: {space: choice, categories: [0.1, fast]}}",
     "space.optim.lr: categories holds 'fast' (str) but optim.lr is a number; accepted: uniform, loguniform"),
    ("space: {truncation.k: {space: choice, categories: [1e1, 5]}}",
     "space.truncation.k: categories holds '1e1' (str) but truncation.k is an integer (YAML reads"),
    ("space: {optim.lr: {space: choice, categories: [1e-3, 'inf']}}",
     "space.optim.lr: categories holds 'inf' (str) but optim.lr is a number"),
    # non-finite numbers anywhere, and q
    ("space: {optim.lr: {space: uniform, lower: 0.1, upper: .inf}}",
     "space.optim.lr: got lower=0.1, upper=inf; accepted: finite numbers with lower < upper"),
    ("space: {optim.lr: {space: loguniform, lower: .nan, upper: 0.1}}",
     "space.optim.lr: got lower=nan, upper=0.1; accepted: finite numbers"),
    ("space: {optim.lr: {space: uniform, lower: -.inf, upper: 0.1}}", "space.optim.lr: got lower=-inf"),
    ("space: {optim.lr: {space: choice, categories: [0.01, .nan]}}",
     "space.optim.lr: categories holds nan; accepted: finite values"),
    ("space: {optim.lr: {space: grid_search, values: [.inf]}}",
     "space.optim.lr: values holds inf; accepted: finite values"),
    ("space: {optim.betas: {space: choice, categories: [[0.9, .inf]]}}",
     "space.optim.betas: categories holds [0.9, inf]; accepted: finite values"),
    ("space: {optim.lr: {space: quniform, lower: 0.1, upper: 0.5, q: .inf}}",
     "space.optim.lr: got q=inf; accepted: a finite number with 0 < q <= upper - lower (0.4)"),
    ("space: {optim.lr: {space: quniform, lower: 0.1, upper: 0.5, q: .nan}}",
     "space.optim.lr: got q=nan; accepted: a finite number"),
    ("space: {optim.lr: {space: quniform, lower: 0.1, upper: 0.5, q: 0}}", "space.optim.lr: got q=0; accepted"),
    ("space: {optim.lr: {space: quniform, lower: 0.1, upper: 0.5, q: -0.1}}", "space.optim.lr: got q=-0.1; accepted"),
    ("space: {optim.lr: {space: quniform, lower: 0.1, upper: 0.5, q: 0.5}}",
     "space.optim.lr: got q=0.5; accepted: a finite number with 0 < q <= upper - lower (0.4)"),
    ("space: {optim.lr: {space: quniform, lower: 0.1, upper: 0.5, q: x}}", "space.optim.lr: got q='x'"),
    # values that are only invalid together (tiny-cpu: N=10, K=10)
    ("space: "
     "{sampling.num_steps: {space: randint, lower: 4, upper: 20}, truncation.k: {space: randint, lower: 1, upper: 10}}",
     "space.sampling.num_steps + space.truncation.k: the combination sampling.num_steps=4, truncation.k=9 makes "
     "the config invalid (truncation.k: got 9; accepted: 1 <= k <= sampling.num_steps (4)); accepted:"),
    ("space: {truncation.strategy: {space: choice, categories: [fixed, uniform]}, "
     "truncation.high: {space: choice, categories: [5, 20]}}",
     "space.truncation.strategy + space.truncation.high: the combination truncation.strategy='uniform', "
     "truncation.high=20 makes the config invalid"),
    ("space: {optim.lr: {space: loguniform, lower: 1.0e-4, upper: 1.0e-1}, "
     "truncation.k: {space: randint, lower: 1, upper: 50}}",
     "space.truncation.k: value 49 makes the config invalid (truncation.k: got 49"),  # lr plays no part: not named
    ("space: {optim.betas: {space: choice, categories: [[0.9, 0.99], [0.9, x]]}}",
     "space.optim.betas: value [0.9, 'x'] makes the config invalid"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_spaces_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "k.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_space(str(tmp_path / "k.yaml"), load_config("tiny-cpu"))
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)
    assert "accepted:" in str(err.value), str(err.value)


GOOD = [
    "space: {trainer.fail_at_step: {space: grid_search, values: [1, null]}}",  # Optional[int] takes null
    "space: "
    "{sampling.num_steps: {space: randint, lower: 4, upper: 20}, truncation.k: {space: randint, lower: 1, upper: 5}}",
    "space: {truncation.k: {space: choice, categories: [2, 5]}, "
    "sampling.guidance_scale: {space: randint, lower: 2, upper: 9}}",
    "space: {optim.lr: {space: quniform, lower: 0.01, upper: 0.05, q: 0.01}, "
    "rewards.brightness.weight: {space: choice, categories: [1, 0.5]}}",
    "space: {sampling.checkpoint_vae: {space: choice, categories: [true, false]}, "
    "ray.resources_per_worker.CPU: {space: uniform, lower: 0.1, upper: 0.4}}",
    "space: {optim.betas: {space: choice, categories: [[0.9, 0.999], [0.8, 0.99]]}}",
]


@pytest.mark.parametrize("text", GOOD)
def test_good_spaces_of_every_field_type_validate(tmp_path, text):
    (tmp_path / "k.yaml").write_text(text)
    assert load_space(str(tmp_path / "k.yaml"), load_config("tiny-cpu")).space


def test_numbers_yaml_reads_as_strings_become_floats_on_float_fields(tmp_path):
    """PyYAML reads 1e-05 (no dot) as a string; on a float field it is the number it spells."""
    (tmp_path / "k.yaml").write_text("space: {optim.lr: {space: grid_search, values: [0.1, 1e-05]},"
                                     " optim.weight_decay: {space: loguniform, lower: 1e-6, upper: 1.0e-2}}")
    space = load_space(str(tmp_path / "k.yaml"), load_config("tiny-cpu")).space
    assert space["optim.lr"]["values"] == [0.1, 1e-05] and space["optim.weight_decay"]["lower"] == 1e-6


def test_past_the_cap_every_pair_of_extremes_is_still_checked(tmp_path, monkeypatch):
    """Above MAX_COMBINATIONS a pairwise covering set of full combinations still finds K > N."""
    monkeypatch.setattr(sweep_space, "MAX_COMBINATIONS", 4)
    (tmp_path / "k.yaml").write_text(
        "space: {optim.lr: {space: choice, categories: [0.01, 0.02, 0.03]},"
        " sampling.num_steps: {space: choice, categories: [4, 10, 20]}, truncation.k: "
        "{space: choice, categories: [1, 2, 8]}}")
    with pytest.raises(ConfigError) as err:
        load_space(str(tmp_path / "k.yaml"), load_config("tiny-cpu"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("space.sampling.num_steps + space.truncation.k: the "
                                                      "combination sampling.num_steps=4, truncation.k=8"), message
    extremes = {"a": [1, 2, 3], "b": [1, 2], "c": [1, 2, 3], "d": [1]}
    rows = sweep_space._pairwise_rows(extremes)
    assert len(rows) < 3 * 2 * 3
    for x, y in [("a", "b"), ("a", "c"), ("b", "c"), ("a", "d")]:
        assert {(r[x], r[y]) for r in rows} == {(u, v) for u in extremes[x] for v in extremes[y]}


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

    from alignprop.platform.sweeps.tune import _scheduler, _search

    spec = load_space("reward_weights", base_config("sd15-aesthetic+hps"))
    assert isinstance(_search(spec), OptunaSearch)
    assert isinstance(_scheduler(spec, 100), ASHAScheduler)
    assert load_space("k_lr", load_config("tiny-cpu")).num_trials(8) == 8


@pytest.mark.parametrize("text, message", [
    ("space: {optim.lr: [", "k.yaml: not valid YAML (line 1, column 20"),
    ("space: "
     "{sampling.num_steps: {space: randint, lower: 4, upper: 20}, truncation.k: {space: randint, lower: 1, upper: 10}}",
     "space.sampling.num_steps + space.truncation.k: the combination sampling.num_steps=4, truncation.k=9"),
], ids=["malformed-yaml", "k-above-n-together"])
def test_tune_cli_bad_space_is_one_line_and_writes_nothing(tmp_path, text, message):
    (tmp_path / "k.yaml").write_text(text)
    command = [sys.executable, "-m", "alignprop.platform.cli", "tune", "--config", "tiny-cpu", "--space", "k.yaml"]
    proc = subprocess.run(command,
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alignprop: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith(f"alignprop: error: {message}") and "accepted:" in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.yaml"]  # no mlflow.db, no ray_results
