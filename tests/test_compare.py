"""`alignprop compare`: the ratio/CI arithmetic on synthetic curves (platform/compare/ratios.py), and the
tiny protocol run for real (two arms, two seeds, a few updates; local Ray, MLflow on sqlite)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from alignprop.platform.compare.ratios import (Curve, auc, crosses, first_crossing, go_no_go, ranking, ratio_ci, reach,
                                               targets)


def linear(slope: float, noise: np.ndarray, budget: float = 100.0, points: int = 11) -> Curve:
    """Seeds × evaluations of y = slope·x/budget + each seed's offset (0 at x = 0 for the mean)."""
    x = np.linspace(0, budget, points)
    return Curve(np.tile(x, (len(noise), 1)), slope * x / budget + noise[:, None] * (x > 0))


def test_first_crossing_interpolates_and_says_never():
    x, y = np.array([0.0, 10, 20]), np.array([0.0, 0.5, 1.0])
    assert first_crossing(x, y, 0.75) == 15.0 and first_crossing(x, y, 0.0) == 0.0
    assert math.isnan(first_crossing(x, y, 1.01))


def test_ratio_of_two_clean_curves_is_the_ratio_of_their_slopes_with_a_tight_ci():
    fast, slow = linear(1.0, np.array([-0.01, 0.0, 0.01])), linear(0.25, np.array([-0.01, 0.0, 0.01]))
    found = ratio_ci(slow, fast, 0.2)  # slow reaches 0.2 at 80, fast at 20
    assert found["ratio"] == pytest.approx(4.0) and found["unreached"] == 0
    assert found["low"] <= 4.0 <= found["high"] and found["high"] / found["low"] < 1.2


def test_no_ratio_where_a_curve_does_not_cross_the_target_by_two_standard_errors():
    fast = linear(1.0, np.array([-0.01, 0.0, 0.01]))
    noisy = linear(0.25, np.array([-0.3, 0.0, 0.3]))  # its mean reaches 0.2, but not beyond 2 SE
    assert not math.isnan(reach(noisy, 0.2)) and not crosses(noisy, 0.2)
    assert math.isnan(ratio_ci(noisy, fast, 0.2)["ratio"])
    never = linear(0.1, np.array([0.0, 0.0]))
    assert math.isnan(reach(never, 0.2)) and math.isnan(ratio_ci(never, fast, 0.2)["ratio"])


def test_bootstrap_ci_covers_the_true_ratio_on_noisy_seeds():
    """Seeds whose slopes vary: the 95 % CI of the ratio holds the ratio of the mean slopes in most draws."""
    rng, covered = np.random.default_rng(1), 0
    for trial in range(40):
        x = np.linspace(0, 100, 21)
        fast = Curve(np.tile(x, (4, 1)), np.outer(rng.normal(1.0, 0.1, 4), x / 100))
        slow = Curve(np.tile(x, (4, 1)), np.outer(rng.normal(0.5, 0.05, 4), x / 100))
        found = ratio_ci(slow, fast, 0.3, samples=400, seed=trial)
        covered += found["low"] <= 2.0 <= found["high"]
    assert covered >= 30, covered  # 95 % nominal; a percentile bootstrap of 4 seeds undercovers a little


def test_targets_ranking_auc_and_go_no_go():
    assert targets({"ddpo": 0.6, "grpo": 0.9}, 0.0) == {"ddpo final": 0.6, "grpo final": 0.9,
                                                        "33% of the way to ddpo": pytest.approx(0.2),
                                                        "67% of the way to ddpo": pytest.approx(0.4)}
    assert targets({"ddpo": -0.1, "grpo": 0.9}, 0.0) == {"grpo final": 0.9,
                                                         "33% of the way to grpo": pytest.approx(0.3),
                                                         "67% of the way to grpo": pytest.approx(0.6)}
    assert targets({"ddpo": 0.0}, 0.0) == {}  # a baseline that did not improve on the base model sets no target
    fast, slow = linear(1.0, np.array([0.0, 0.01])), linear(0.25, np.array([0.0, 0.01]), budget=50)
    ranked = ranking({"slow": slow, "fast": fast})  # at the smaller budget, 50: fast 0.5, slow 0.25
    assert [name for name, *_ in ranked] == ["fast", "slow"]
    assert ranked[0][1] == pytest.approx(0.505) and ranked[1][1] == pytest.approx(0.255)
    assert auc(np.array([0, 10, 20]), np.array([0.0, 1.0, 1.0])) == 0.75
    images, values = np.array([0, 1000, 2000, 3000]), np.array([0.0, 0.02, 0.3, 0.9])
    verdict = go_no_go(images, values, np.full(4, 0.05))
    assert verdict["go"] and verdict["rise"] == 0.3 and verdict["z"] == pytest.approx(0.3 / math.sqrt(0.005))
    assert not go_no_go(images, np.array([0.0, 0.02, 0.05, 0.9]), np.full(4, 0.05))["go"]  # 0.9 comes after 2000


def compare_cli(tmp_path, *overrides):
    """`alignprop compare` as a user runs it, in its own process (Ray Tune keeps per-process state that a
    second Ray in the same process would trip over)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    return subprocess.run([sys.executable, "-m", "alignprop.platform.cli", "compare", "--config", "toy-count",
                           "--protocol", "tiny", "--name", "tiny-compare", "--max-concurrent", "2", *overrides],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900)


def test_a_reference_arm_sets_the_targets_of_the_layout_protocols():
    from alignprop.platform.compare.protocol import LAYOUT3
    from alignprop.platform.compare.report import AXES, ratio_rows

    def grow(slope: float) -> dict:
        return {"gold": {axis: linear(slope, np.array([0.0, 0.01, -0.01]), budget=480) for axis, _ in AXES}}

    curves = {"alignprop": grow(1.0), "drtune": grow(2.0), "direct_align": grow(0.5), "refl": grow(1.0)}
    rows = ratio_rows(curves, list(LAYOUT3.arms))
    assert {r["baseline"] for r in rows} == {"alignprop"} and {r["method"] for r in rows} == {"drtune", "direct_align",
                                                                                              "refl"}
    level = next(r for r in rows if r["target"] == "67% of the way to alignprop" and r["method"] == "drtune"
                 and r["axis"] == "images_seen")
    assert level["ratio"] == pytest.approx(2.0, rel=0.05)  # drtune's slope is twice alignprop's
    assert LAYOUT3.arms[0].sets_targets and not LAYOUT3.arms[0].rl
    assert all("target=3" in o for o in LAYOUT3.common[-3:])


def test_the_go_no_go_runs_first_on_ddpo_and_says_go_only_at_two_standard_errors():
    from alignprop.platform.compare.driver import go_no_go_verdict
    from alignprop.platform.compare.protocol import PAPER, arm_config

    ddpo = next(a for a in PAPER.arms if a.name == "ddpo")
    assert ddpo.go_no_go == 2048 and all(not a.go_no_go for a in PAPER.arms if a.name != "ddpo")
    probe = arm_config("toy-count", [], PAPER, replace(ddpo, budget=ddpo.go_no_go), "x", lr=1e-3)
    assert probe.trainer.max_steps == 32 and probe.optim.lr == 1e-3  # 64 images per step
    images, errors = np.array([0, 512, 1024, 2048]), np.full(4, 0.05)
    text, go = go_no_go_verdict(ddpo, go_no_go(images, np.array([-1.5, -1.45, -1.4, -1.3]), errors, 2048))
    assert go and "go/no-go: validation gold rose +0.2 (2.8 SE) within 2048 images: go" in text
    text, go = go_no_go_verdict(ddpo, go_no_go(images, np.array([-1.5, -1.45, -1.48, -1.44]), errors, 2048))
    assert not go and text.endswith("NO-GO, under 2 SE")


def test_the_lr_grid_grows_past_the_end_where_the_best_rate_sits():
    from alignprop.platform.compare.driver import beyond

    grid = [1e-3, 3e-3, 1e-2]
    assert beyond(grid, {1e-3: -1.5, 3e-3: -1.2, 1e-2: -0.8}) == 3e-2  # best at the top: up the 1-3-10 ladder
    assert beyond(grid + [3e-2], {1e-3: -1.5, 3e-3: -1.2, 1e-2: -0.8, 3e-2: -0.7}) == 1e-1
    assert beyond([3e-4, 1e-3, 3e-3], {3e-4: 0.2, 1e-3: 0.1, 3e-3: 0.0}) == 1e-4  # best at the bottom: down
    assert beyond(grid, {1e-3: -1.5, 3e-3: -0.9, 1e-2: -1.0}) is None  # inside: the grid brackets it
    assert beyond(grid + [3e-2], {1e-3: -1.5, 3e-3: -1.2, 1e-2: -0.8}) is None  # 3e-2 diverged: 1e-2 is inside
    assert beyond([2e-3, 4e-3], {2e-3: 0.0, 4e-3: 1.0}) == 8e-3  # off the ladder: the end spacing
    assert beyond([1e-2], {1e-2: 0.0}) is None  # one rate brackets nothing


@pytest.mark.slow
def test_the_tiny_protocol_runs_both_phases_and_reports_into_mlflow(tmp_path):
    from mlflow import MlflowClient

    from alignprop.platform.sweeps.resume import sweep_children

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    few = ["one red circle on a white background", "two blue squares on a black background"]
    validation = ["three green triangles on a gray background", "one blue circle on a white background"]
    overrides = [f"tracking.uri={uri}", f"ray.storage_path={tmp_path}/ray", "trainer.eval_prompt_file=null",
                 f"trainer.eval_prompts=[{', '.join(few)}]", "trainer.val_prompt_file=null",
                 f"trainer.val_prompts=[{', '.join(validation)}]"]
    first = compare_cli(tmp_path, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-compare")
    [report] = client.search_runs([experiment.experiment_id], "tags.`alignprop.role` = 'compare'")
    assert report.info.status == "FINISHED"
    chosen = {arm: float(report.data.params[f"compare.{arm}.lr"]) for arm in ("alignprop", "grpo")}
    assert chosen["alignprop"] in (1e-3, 1e-2) and chosen["grpo"] == 1e-2
    listed = {f.path for f in client.list_artifacts(report.info.run_id)}
    assert {"sample_efficiency.png", "sample_efficiency.md", "sample_efficiency.csv"} <= listed
    for arm, trials in (("alignprop", 2), ("grpo", 1)):
        lr_runs = sweep_children(uri, "tiny-compare", f"tiny-compare-{arm}-lr")
        seed_runs = sweep_children(uri, "tiny-compare", f"tiny-compare-{arm}-seeds-lr{chosen[arm]:g}")
        assert len(lr_runs) == trials and len(seed_runs) == 2
        seeds = sorted(int(r.data.params["trainer.seed"]) for r in seed_runs.values())
        lrs = {float(r.data.params["optim.lr"]) for r in seed_runs.values()}
        assert seeds == [1, 2] and lrs == {chosen[arm]}
        for r in seed_runs.values():  # every arm judged by the common sampler, on test and validation
            assert r.data.params["trainer.eval_eta"] == "0.0" and "val/toy_count_judge" in r.data.metrics
    text = client.download_artifacts(report.info.run_id, "sample_efficiency.md", str(tmp_path))
    text = open(text).read()
    assert "| alignprop |" in text and "| grpo |" in text and "Ranking on test gold at equal images" in text
    assert "[compare] alignprop: lr" in first.stderr and "[compare] grpo: go/no-go:" in first.stderr
    again = compare_cli(tmp_path, *overrides)  # resumes: every sweep is done, nothing reruns
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming sweep tiny-compare-alignprop-lr" in again.stderr and "2 of 2 planned trials done" in again.stderr
    assert len(sweep_children(uri, "tiny-compare", f"tiny-compare-alignprop-seeds-lr{chosen['alignprop']:g}")) == 2
    [same] = client.search_runs([experiment.experiment_id], "tags.`alignprop.role` = 'compare'")
    assert same.info.run_id == report.info.run_id
