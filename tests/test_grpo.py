"""GRPO (trainers/grpo.py) against Flow-GRPO's own lines, and the RL options the fair comparison needs:
DDPO's updates per epoch, images per prompt, the common evaluation sampler and the validation split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignprop.platform.config import ConfigError, load_config
from alignprop.platform.models import build_tiny
from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext, eval_settings
from alignprop.trainers.ddpo import gaussian_log_prob
from alignprop.trainers.families import FAMILIES, sde_mean_std
from alignprop.trainers.grpo import group_advantages, kl_to_base


def reference_sde_step_with_logprob(self, model_output, timestep, sample, noise_level, prev_sample):
    """yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py @54809b5 `sde_step_with_logprob`
    (sde_type 'sde', prev_sample given), its essential lines."""
    step_index = [self.index_for_timestep(t) for t in timestep]
    prev_step_index = [step + 1 for step in step_index]
    sigma = self.sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = self.sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = self.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def reference_group_advantages(prompts, rewards, global_std=True):
    """yifan123/flow_grpo flow_grpo/stat_tracking.py @94e23ee `PerPromptStatTracker.update` (type 'grpo', a
    fresh tracker: Flow-GRPO clears it every epoch), its essential lines."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(prompt_rewards, axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        else:
            std = np.std(prompt_rewards, axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


def test_sd3_sde_step_and_log_prob_are_flow_grpos():
    scheduler = build_tiny("sd3").scheduler
    scheduler.set_timesteps(8)
    x, pred, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for times in (scheduler.timesteps[torch.tensor([0, 3, 7])], scheduler.timesteps[[2]].expand(3)):
        mean, std, std_dev_t = sde_mean_std(scheduler, pred, times, x, 0.7)
        x_next = mean + std * noise
        _, log_prob, ref_mean, ref_std_dev_t = reference_sde_step_with_logprob(scheduler, pred, times, x, 0.7, x_next)
        torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(std_dev_t, ref_std_dev_t, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), log_prob, atol=1e-5, rtol=1e-6)
    t = scheduler.timesteps[0]  # the sampler's step at eta > 0 is that SDE; at eta 0 it is the scheduler's Euler
    torch.testing.assert_close(FAMILIES["sd3"].step(scheduler, pred, t, x, 0.7, noise),
                               sum(sde_mean_std(scheduler, pred, t, x, 0.7)[i] * f for i, f in ((0, 1), (1, noise))))
    scheduler._step_index = None
    euler = x + (scheduler.sigmas[1] - scheduler.sigmas[0]) * pred
    torch.testing.assert_close(FAMILIES["sd3"].step(scheduler, pred, t, x, 0.0, None), euler)


def test_group_advantages_are_flow_grpos_stat_tracker():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12)
    prompts = [p for p in ("a", "b", "c") for _ in range(4)]
    for global_std in (True, False):
        np.testing.assert_allclose(group_advantages(rewards, 4, global_std),
                                   reference_group_advantages(prompts, rewards, global_std), rtol=1e-12)
    same = group_advantages(np.ones(8), 4, False)
    assert np.all(same == 0)  # a group of equal rewards teaches nothing (and divides by 1e-4, not 0)


def test_kl_to_base_is_zero_at_the_base_and_the_gaussian_kl_for_one_sigma():
    mean, std = torch.randn(2, 4, 8, 8), torch.full((2, 1, 1, 1), 0.3)
    assert kl_to_base(mean, mean.clone(), std) == 0
    shifted = mean + 0.1
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(shifted, 0.3),
                                              torch.distributions.Normal(mean, 0.3)).mean()
    torch.testing.assert_close(kl_to_base(shifted, mean, std), exact)


def recipe(overrides, preset="tiny-cpu"):
    cfg = load_config(preset, ["trainer.eval_every=0", "deepspeed.zero_stage=1", "sampling.num_steps=4",
                               "truncation.k=2", "trainer.batch_size=4", *overrides])
    return AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()


GRPO = ["trainer.algorithm=grpo", "grpo.group_size=4", "optim.grad_accum=2", "grpo.updates_per_epoch=2",
        "optim.lr=1e-2", "grpo.clip_range=1e-2"]


def test_grpo_first_update_is_on_policy_and_the_second_is_not(deepspeed_world):
    """Two micro-batches, two updates: the first repeats the sampler's calls (ratio exactly 1, and no KL:
    the LoRA starts at the base); the second sees the weights the first moved."""
    r = recipe(GRPO)
    prompts = [r.pick_prompts(0, micro) for micro in range(2)]
    assert all(len(set(p)) == 1 for p in prompts) and prompts[0] != prompts[1]  # a group per micro-batch
    first = {n: p.detach().clone() for n, p in r.lora_parameters()}
    metrics = r.train_step(0)
    assert metrics["ratio_dev_first"] == 0.0, metrics
    assert metrics["approx_kl"] > 0 and metrics["kl"] > 0 and metrics["k"] == 3  # int(4 × 0.99) steps trained
    assert any(not torch.equal(p, first[n]) for n, p in r.lora_parameters())
    # sampling 4 steps × CFG; training 3 steps × CFG × (policy + base model)
    assert (metrics["images_seen"], metrics["unet_evals"]) == (8, 8 * (4 * 2 + 3 * 2 * 2))


def test_grpo_trains_sd3_with_the_sde_sampler(deepspeed_world):
    r = recipe([*GRPO, "grpo.kl_coef=0"], preset="tiny-sd3-cpu")
    metrics = r.train_step(0)
    assert metrics["ratio_dev_first"] == 0.0 and metrics["approx_kl"] > 0 and "kl" not in metrics


def test_ddpo_updates_per_epoch_make_the_later_update_off_policy(deepspeed_world):
    r = recipe(["trainer.algorithm=ddpo", "sampling.eta=1.0", "optim.grad_accum=2", "ddpo.updates_per_epoch=2",
                "optim.lr=1e-2", "trainer.images_per_prompt=2"])
    prompts = [r.pick_prompts(0, micro) for micro in range(2)]
    assert all(p[0] == p[1] and p[2] == p[3] for p in prompts)  # 2 images of each of 4 prompts
    one_update = recipe(["trainer.algorithm=ddpo", "sampling.eta=1.0", "optim.grad_accum=2", "optim.lr=1e-2"])
    metrics, single = r.train_step(0), one_update.train_step(0)
    assert metrics["ratio_dev_first"] == 0.0 and metrics["approx_kl"] > 0 and metrics["clipfrac"] > 0
    assert single["approx_kl"] == 0.0 and single["clipfrac"] == 0.0  # one update: all on-policy


def test_evaluation_uses_its_own_sampler_and_scores_the_validation_split(deepspeed_world):
    common = ["trainer.eval_every=1", "trainer.eval_seeds=1", "trainer.eval_prompts=[a cat]", "sampling.eta=1.0"]
    r = recipe([*common, "trainer.eval_eta=0.0", "trainer.eval_num_steps=3", "trainer.val_prompts=[a dog, an owl]",
                "trainer.best_metric=val/reward_total"])
    settings = eval_settings(r.cfg)
    assert (settings.eta, settings.num_steps, r.cfg.sampling.eta, r.cfg.sampling.num_steps) == (0.0, 3, 1.0, 4)
    metrics = r.evaluate(0)
    assert {"eval/reward_total", "val/reward_total"} <= set(metrics)
    assert r.state.best_eval == metrics["val/reward_total"]
    training_sampler = recipe(common).evaluate(0)  # the same weights and seeds, judged by the training sampler
    assert "val/reward_total" not in training_sampler
    assert training_sampler["eval/reward_total"] != metrics["eval/reward_total"]


@pytest.mark.parametrize("overrides, message", [
    (["trainer.algorithm=grpo", "sampling.eta=1.0", "grpo.group_size=3"], r"^grpo.group_size: got 3; accepted: a "
     r"divisor of the images per step \(trainer.batch_size × optim.grad_accum × ray.num_workers = 4\)$"),
    (["trainer.algorithm=grpo", "sampling.eta=1.0", "grpo.group_size=1"], r"^grpo.group_size: got 1; accepted: >= 2"),
    (["trainer.algorithm=grpo", "sampling.eta=0.0", "grpo.group_size=2"], r"^sampling.eta: got 0 with trainer"
     r".algorithm=grpo on an sd pipeline"),
    (["ddpo.updates_per_epoch=2"], r"^ddpo.updates_per_epoch: got 2 with optim.grad_accum=1; accepted: a divisor"),
    (["trainer.images_per_prompt=3"], r"^trainer.images_per_prompt: got 3; accepted: a divisor"),
    (["trainer.eval_eta=2"], r"^trainer.eval_eta: got 2.0; accepted: 0 <= eta <= 1, or null for sampling.eta$"),
    (["trainer.best_metric=val/reward_total"], r"^trainer.best_metric: got 'val/reward_total'; accepted: "
     r"eval/reward_total"),
    (["grpo.kl_coef=-1"], r"^grpo.kl_coef: got -1.0; accepted: >= 0"),
])
def test_rl_options_are_validated_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", overrides)


def test_grpo_on_sd3_reads_its_noise_from_grpo_sde_noise():
    cfg = load_config("tiny-sd3-cpu", ["trainer.algorithm=grpo", "grpo.group_size=2"])
    assert cfg.sampling.eta == 0 and cfg.grpo.sde_noise == 0.7
    with pytest.raises(ConfigError, match=r"^trainer.eval_eta: got 0.5 for an sd3 pipeline"):
        load_config("tiny-sd3-cpu", ["trainer.eval_eta=0.5"])
