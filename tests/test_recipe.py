"""The AlignProp recipe in one process with a real DeepSpeed engine (gloo, world size 1)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignprop.platform.config import load_config
from alignprop.platform.models import LORA_WEIGHTS_NAME
from alignprop.trainers.alignprop import STATE_FILE, AlignPropRecipe, WorkerContext
from alignprop.trainers.checkpoint import ENGINE_STATE_FILE, OPTIMIZER_FILE
from alignprop.trainers.sampling import draw_grad_steps


def recipe(overrides, **ctx):
    cfg = load_config("tiny-cpu", ["trainer.eval_every=0", *overrides])
    return AlignPropRecipe(cfg, WorkerContext(progress=False, **ctx)).setup()


def test_reward_rises_on_the_tiny_pipeline(deepspeed_world):
    r = recipe(["deepspeed.zero_stage=1", "trainer.max_steps=10", "trainer.eval_prompts=[a cat, a horse]"])
    before = r.evaluate(0)["eval/brightness"]
    train = [r.train_step(step)["reward/brightness_mean"] for step in range(10)]
    after = r.evaluate(10)["eval/brightness"]
    assert after > before + 0.003, (before, after)
    assert sum(train[-3:]) / 3 > sum(train[:3]) / 3, train


def test_metrics_report_every_component_and_k(deepspeed_world):
    r = recipe(["trainer.max_steps=1", "truncation.strategy=uniform", "truncation.low=2", "truncation.high=4",
                "rewards=[{name: brightness, weight: 1.0}, {name: saturation, weight: 0.5}]"])
    m = r.train_step(0)
    assert 2 <= m["k"] <= 4
    assert m["reward/total_mean"] == pytest.approx(m["reward/brightness_mean"] + 0.5 * m["reward/saturation_mean"],
                                                   rel=1e-5)
    assert {"loss", "grad_norm", "step_time_s", "images_per_s", "peak_memory_mb", "lr"} <= m.keys()


def test_k_is_drawn_per_micro_batch_and_reported_as_the_step_mean(deepspeed_world):
    r = recipe(["trainer.max_steps=1", "sampling.num_steps=4", "optim.grad_accum=3",
                "truncation.strategy=uniform", "truncation.low=1", "truncation.high=4"])
    cfg = r.cfg
    draws = {s: [len(draw_grad_steps(cfg.truncation, 4, cfg.trainer.seed, s, m)) for m in range(3)] for s in range(50)}
    step = next(s for s, ks in draws.items() if len(set(ks)) > 1)
    m = r.train_step(step)
    assert isinstance(m["k"], float) and m["k"] == pytest.approx(sum(draws[step]) / 3)
    assert (m["k_min"], m["k_max"]) == (min(draws[step]), max(draws[step]))


def test_per_step_trains_even_when_a_micro_batch_keeps_no_step(deepspeed_world):
    """per_step can detach every step (probability 4!/5^4 ≈ 4 % at N=4): a zero gradient, no crash."""
    r = recipe(["trainer.max_steps=1", "sampling.num_steps=4", "optim.grad_accum=2", "truncation.strategy=per_step"])
    cfg = r.cfg
    draws = {s: [draw_grad_steps(cfg.truncation, 4, cfg.trainer.seed, s, m) for m in range(2)] for s in range(500)}
    step = next(s for s, kept in draws.items() if [] in kept and any(kept))
    m = r.train_step(step)
    assert m["k"] == pytest.approx(sum(map(len, draws[step])) / 2) and m["k_min"] == 0.0
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0


def test_loss_scale_with_scaled_clipping_gives_the_same_updates(deepspeed_world):
    """The official recipe: loss × 0.01, clip 5 ≡ loss × 1, clip 500. What the math promises is on the
    gradients that reach AdamW (backward is linear in the loss, clipping rescales to the bound): the
    clipped gradients of the scaled run are 0.01 × the raw run's, and the reported loss is unscaled.
    AdamW's update itself is scale-invariant only up to its eps (and fp32 underflow of g² for tiny
    gradients, which differs between CPUs), so the weights after the step are not compared bitwise."""
    from alignprop.trainers.checkpoint import base_optimizer

    base = ["trainer.max_steps=1", "sampling.num_steps=4", "truncation.k=2", "deepspeed.zero_stage=0",
            "rewards=[{name: brightness, weight: 1.0e8}]"]

    def clipped_grads(*overrides):
        r = recipe([*base, *overrides])
        seen = []
        base_optimizer(r.engine).register_step_pre_hook(
            lambda opt, args,
            kwargs: seen.append(torch.cat([p.grad.detach().flatten().clone() for _, p in r.lora_parameters()])))
        metrics = r.train_step(0)
        assert len(seen) == 1, "one optimizer step"
        return metrics, seen[0]

    _, g_unclipped = clipped_grads("optim.loss_scale=1.0", "optim.max_grad_norm=0")
    norm = float(g_unclipped.norm())
    assert norm > 500, "clipping engages at 500"
    scaled, g_scaled = clipped_grads("optim.loss_scale=0.01", "optim.max_grad_norm=5")
    raw, g_raw = clipped_grads("optim.loss_scale=1.0", "optim.max_grad_norm=500")
    assert scaled["loss"] == raw["loss"], "the unscaled loss is reported (same weights at step 0)"

    def relative_error(got, expected):  # fp32 rounding is bounded relative to the vector, not per element
        return float((got - expected).norm() / expected.norm())

    assert relative_error(g_raw, g_unclipped * (500 / norm)) < 1e-5, "clipped to the bound"
    assert relative_error(g_scaled / 0.01, g_raw) < 1e-4
    # no clipping: 0.01 × the raw gradient
    _, g_other = clipped_grads("optim.loss_scale=0.01", "optim.max_grad_norm=500")
    assert relative_error(g_other / 0.01, g_unclipped) < 1e-4
    assert float(g_other.norm()) > 2 * float(g_scaled.norm()), "without the matching clip the update differs"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resumed_run_matches_the_uninterrupted_one(deepspeed_world, tmp_path, stage):
    """Bitwise: the resumed run's LoRA and AdamW state at step 4 equal the uninterrupted run's, so
    weights, Adam moments and step, engine counters, reward stats and RNG all round-trip."""

    def keeper(prefix, saved):
        def keep(metrics, directory):
            if directory:
                saved[metrics["step"]] = shutil.copytree(directory, tmp_path / f"{prefix}{metrics['step']}")
        return keep

    saved, again = {}, {}
    overrides = [f"deepspeed.zero_stage={stage}", "trainer.max_steps=4", "trainer.ckpt_every=2", "sampling.num_steps=4",
                 "truncation.k=3"]
    recipe(overrides, report=keeper("step", saved)).train()
    assert sorted(saved) == [2, 4]
    assert {p.name for p in saved[2].iterdir()} == {
        LORA_WEIGHTS_NAME, STATE_FILE, ENGINE_STATE_FILE, OPTIMIZER_FILE, "rng_rank0.safetensors",
        "manifest_rank0.json"}
    engine_state = json.loads((saved[2] / ENGINE_STATE_FILE).read_text())
    assert (engine_state["adam_step"], engine_state["global_steps"], engine_state["zero_stage"]) == (2, 2, stage)

    resumed_reports = []

    def report(metrics, directory):
        resumed_reports.append(metrics["step"])
        keeper("resumed", again)(metrics, directory)

    resumed = recipe(overrides, resume_dir=str(saved[2]), report=report)
    assert resumed.step == 2 and resumed.engine.global_steps == 2
    resumed.train()
    assert resumed_reports == [3, 4], "continues from the checkpoint's step"
    for name in (LORA_WEIGHTS_NAME, OPTIMIZER_FILE):
        expected, got = load_file(saved[4] / name), load_file(again[4] / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key, (got[key] - expected[key]).abs().max())
    resumed_engine, unbroken_engine = (json.loads((run[4] / ENGINE_STATE_FILE).read_text()) for run in (again, saved))
    assert resumed_engine == unbroken_engine
    got = load_file(again[4] / LORA_WEIGHTS_NAME)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k or "lora.up" in k), "the adapter trained"


def test_reward_mix_ema_and_eval_rewards_are_logged_to_mlflow(deepspeed_world, tmp_path):
    from mlflow import MlflowClient

    from alignprop.platform.tracking import open_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = open_run(uri, "mix", "mix-run", {"k": 1}, "name: mix\n")
    r = recipe(["trainer.max_steps=3", "trainer.eval_every=2", "trainer.ema_decay=0.5",
                "rewards=[{name: brightness, weight: 1.0}, {name: saturation, weight: 0.5, normalize: true}]",
                "eval_rewards=[{name: colorfulness}]"], tracking_uri=uri, run_id=run_id)
    r.train()
    client = MlflowClient(uri)
    for key in ("reward/brightness_mean", "reward/saturation_mean", "reward/total_mean"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key
    for key in ("eval/colorfulness", "eval/brightness", "eval_ema/reward_total", "eval_ema/colorfulness"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 2, 3], key  # 0: the base model
    assert {a.path for a in client.list_artifacts(run_id, "lora")} == {"lora/best", "lora/final", "lora/final_ema"}
    assert r.rewards.stats["saturation"][0] == 3 * 2, "running stats saw every image"


def test_early_stop_on_a_falling_held_out_reward_and_stays_stopped(deepspeed_world, tmp_path):
    reports = []

    def keep(metrics, directory):
        reports.append(metrics)
        if directory:
            shutil.copytree(directory, tmp_path / "last", dirs_exist_ok=True)

    overrides = ["trainer.max_steps=8", "trainer.eval_every=1", "trainer.ckpt_every=100",
                 "rewards=[{name: brightness, weight: -1.0}]", "eval_rewards=[{name: brightness, label: held_out}]",
                 "trainer.early_stop_metric=eval/held_out", "trainer.early_stop_patience=2"]
    recipe(overrides, report=keep).train()
    assert reports[-1].get("early_stopped") == 1.0 and len(reports) < 8
    held_out = [m["eval/held_out"] for m in reports]
    assert held_out[-1] < max(held_out)
    again = recipe(overrides, resume_dir=str(tmp_path / "last"), report=keep)
    count = len(reports)
    again.train()
    assert len(reports) == count, "a rerun of an early-stopped run does not train further"
