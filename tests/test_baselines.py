"""The baselines beside AlignProp: DDPO (trainers/ddpo.py), ReFL and DRaFT-LV (options of the recipe),
chosen by trainer.algorithm; every algorithm logs the common x-axis (images_seen, unet_evals, wall_s)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file
from torch import nn

from alignprop.platform.config import ConfigError, LoraSection, ModelSection, load_config
from alignprop.platform.models import LORA_WEIGHTS_NAME, add_lora, build_tiny, load_pipeline
from alignprop.trainers.alignprop import STATE_FILE, AlignPropRecipe, WorkerContext
from alignprop.trainers.checkpoint import OPTIMIZER_FILE
from alignprop.trainers.ddpo import PerPromptStatTracker, gaussian_log_prob, ppo_loss
from alignprop.trainers.families import NaNFreeDDIMScheduler, ddim_mean_std
from alignprop.trainers.sampling import SamplerSettings, draft_lv_images, encode_prompts, negative_prompt, sample

CPU = torch.device("cpu")
SETTINGS = SamplerSettings(6, 5.0, 1.0, 32)  # 6 DDIM steps, CFG 5, η = 1, 32 px


def reference_ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, prev_sample):
    """kvablack/ddpo-pytorch ddpo_pytorch/diffusers_patch/ddim_with_logprob.py @1958463 (epsilon
    prediction, per-sample timesteps), its essential lines."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, scheduler.config.num_train_timesteps - 1)
    alpha_prod_t = scheduler.alphas_cumprod.gather(0, timestep)[:, None, None, None]
    alpha_prod_t_prev = scheduler.alphas_cumprod.gather(0, prev_timestep)[:, None, None, None]
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * model_output
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (std_dev_t**2)) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def test_ddpo_log_prob_is_the_gaussian_density_of_the_ddim_step():
    scheduler = build_tiny("sd").scheduler
    scheduler.set_timesteps(10)
    x, pred, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps:
        x_next = scheduler.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample  # diffusers' own step
        mean, std = ddim_mean_std(scheduler, pred, t.expand(3), x, 1.0)
        torch.testing.assert_close(mean + std * noise, x_next, atol=1e-6, rtol=0)
        direct = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), direct, atol=1e-5, rtol=1e-6)
    mixed = scheduler.timesteps[torch.tensor([0, 4, 8])]  # per-sample timesteps, as DDPO's shuffled training
    x_next = torch.randn(3, 4, 8, 8)
    ours = gaussian_log_prob(x_next, *ddim_mean_std(scheduler, pred, mixed, x, 1.0))
    torch.testing.assert_close(ours, reference_ddim_step_with_logprob(scheduler, pred, mixed, x, 1.0, x_next),
                               atol=1e-5, rtol=1e-6)


def test_ddim_step_has_no_nan_at_zero_terminal_snr_where_diffusers_has():
    config = build_tiny("sd").scheduler.config
    ours = NaNFreeDDIMScheduler.from_config(config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                            timestep_spacing="trailing")
    theirs = DDIMScheduler.from_config(ours.config)
    for s in (ours, theirs):
        s.set_timesteps(6)
    x, pred, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ours.timesteps[0]
    assert ours.alphas_cumprod[t] == 0
    assert theirs.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample.isnan().any()  # diffusers 0.42
    assert torch.isfinite(ours.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample).all()
    for t in ours.timesteps[1:]:  # elsewhere the same numbers, bitwise
        assert torch.equal(ours.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample,
                           theirs.step(pred, t, x, eta=1.0, variance_noise=noise).prev_sample)
    pipe = load_pipeline(ModelSection(pretrained="toy-world"))
    assert type(pipe.scheduler) is NaNFreeDDIMScheduler  # what `alignprop sample` and the MLflow Model call
    image = pipe("two red circles on a white background", num_inference_steps=4, eta=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all() and image.std() > 0.05


def test_clipped_objective_has_no_gradient_outside_the_clip_range():
    eps = 0.2
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5], requires_grad=True)  # clipped, clipped, inside-side, inside-side
    ppo_loss(advantages, ratio, eps).backward()
    assert ratio.grad[:2].tolist() == [0.0, 0.0], "beyond 1 ± ε in the advantage's direction: no gradient"
    assert ratio.grad[2:].tolist() == [-0.25, 0.25], "on the other side the unclipped term is the max"
    ratio.grad = None
    inside = torch.tensor([1.1, 0.9], requires_grad=True)
    ppo_loss(torch.tensor([2.0, -3.0]), inside, eps).backward()
    assert inside.grad.tolist() == [-1.0, 1.5]


def test_per_prompt_stat_tracker_is_ddpo_pytorchs():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    first = tracker.update(["a", "b", "a"], [1.0, 5.0, 3.0])
    batch = [1.0, 5.0, 3.0]
    mean, std = sum(batch) / 3, torch.tensor(batch).std(unbiased=False).item() + 1e-6
    assert first[1] == pytest.approx((5.0 - mean) / std)  # "b" has 1 < min_count rewards: the batch's statistics
    assert first[0] == pytest.approx((1.0 - 2.0) / (1.0 + 1e-6))  # "a" has 2: its own buffer (incl. this batch)
    restored = PerPromptStatTracker(4, 2, json.loads(json.dumps(tracker.state())))
    assert restored.update(["b"], [7.0]).tolist() == tracker.update(["b"], [7.0]).tolist()


def lora_pipe():
    pipe = build_tiny("sd")
    params = add_lora(pipe.unet, LoraSection(rank=4, alpha=4))
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return pipe, params


def recipe(overrides, preset="tiny-cpu", **ctx):
    cfg = load_config(preset, ["trainer.eval_every=0", "deepspeed.zero_stage=1", "sampling.num_steps=4",
                               "truncation.k=2", *overrides])
    return AlignPropRecipe(cfg, WorkerContext(progress=False, **ctx)).setup()


def test_ddpo_ratio_is_exactly_one_on_the_first_inner_epoch(deepspeed_world):
    """One update per inner epoch: the first epoch's recomputed log-probs equal the sampled ones
    bitwise (same weights, per-sample shuffled timesteps), so approx_kl and clipfrac are exactly 0;
    the second epoch sees the updated weights."""
    one = recipe(["trainer.algorithm=ddpo", "trainer.batch_size=4"]).train_step(0)
    assert one["approx_kl"] == 0.0 and one["clipfrac"] == 0.0 and one["k"] == 4
    two = recipe(["trainer.algorithm=ddpo", "trainer.batch_size=4", "ddpo.inner_epochs=2",
                  "optim.lr=1e-2"]).train_step(0)
    assert two["approx_kl"] > 0 and two["clipfrac"] > 0
    # sampling 4 steps × CFG, training 4 × CFG
    assert (one["images_seen"], one["unet_evals"]) == (4, 4 * (4 * 2 + 4 * 2))


class Recorder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.recording, self.config = model, [], True, model.config

    def forward(self, *args, **kwargs):
        if self.recording:
            self.calls.append(torch.is_grad_enabled())
        return self.model(*args, **kwargs)


def test_refl_has_a_graph_at_its_stop_step_only_and_decodes_its_x0_estimate():
    pipe, params = lora_pipe()
    cond, neg = encode_prompts(pipe, ["a cat", "a dog"], CPU), negative_prompt(pipe, 2, CPU)
    recorder = Recorder(pipe.unet)
    out = sample(pipe, recorder, cond, neg, torch.Generator().manual_seed(0), SETTINGS, grad_steps=[4], stop_at=4)
    recorder.recording = False
    assert recorder.calls == [False] * 4 + [True], "no call after the stop step; a graph at it only"
    out.images.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    trajectory = []
    with torch.no_grad():  # the same draws without stopping: x̂0 at step 4 is DDIM's pred_original_sample
        sample(pipe, pipe.unet, cond, neg, torch.Generator().manual_seed(0), SETTINGS, trajectory=trajectory)
    t, x, pred, _ = trajectory[4]
    torch.testing.assert_close(out.latents.detach(), pipe.scheduler.step(pred, t, x).pred_original_sample, atol=1e-6,
                               rtol=0)


def test_draft_lv_has_graphs_in_its_renoised_copies_only():
    pipe, params = lora_pipe()
    cond, neg = encode_prompts(pipe, ["a cat", "a dog"], CPU), negative_prompt(pipe, 2, CPU)
    recorder = Recorder(pipe.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x0 = sample(pipe, recorder, cond, neg, generator, SETTINGS).latents
    x0.requires_grad_(True)  # DRaFT-LV's stop_grad(x0): no gradient may reach it
    images = draft_lv_images(pipe, recorder, cond, neg, x0, 3, generator, SETTINGS)
    recorder.recording = False
    assert images.shape == (6, 3, 32, 32) and recorder.calls == [False] * 6 + [True] * 3
    images.mean().backward()
    assert x0.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("algorithm, evals", [("refl", None), ("draft_lv", 4 * 2 + 2 * (2 + 2))])
def test_refl_and_draft_lv_train_through_the_recipe(deepspeed_world, algorithm, evals):
    r = recipe([f"trainer.algorithm={algorithm}", "trainer.max_steps=2"])
    first = {n: p.detach().clone() for n, p in r.lora_parameters()}
    metrics = [r.train_step(step) for step in range(2)]
    assert metrics[-1]["k"] == 1 and metrics[-1]["images_seen"] == 4 and metrics[-1]["wall_s"] > 0
    assert any(not torch.equal(p, first[n]) for n, p in r.lora_parameters())
    if evals:
        assert metrics[0]["unet_evals"] == 2 * evals  # N × CFG + copies × (CFG + recompute), 2 images
    else:  # ReFL: stop ∈ [3, 3] for N = 4 → (stop + 1) × CFG + recompute
        assert metrics[0]["unet_evals"] == 2 * ((3 + 1) * 2 + 2)


def test_ddpo_resumes_mid_run_as_the_uninterrupted_run(deepspeed_world, tmp_path):
    """Bitwise: LoRA and AdamW state at step 3 equal, and the per-prompt statistics round-trip."""
    def keeper(prefix, saved):
        def keep(metrics, directory):
            if directory:
                saved[metrics["step"]] = shutil.copytree(directory, tmp_path / f"{prefix}{metrics['step']}")
        return keep

    overrides = ["trainer.algorithm=ddpo", "trainer.max_steps=3", "trainer.ckpt_every=1", "ddpo.stats_min_count=2"]
    saved, again = {}, {}
    recipe(overrides, report=keeper("run", saved)).train()
    state = json.loads((saved[1] / STATE_FILE).read_text())
    assert state["ddpo_stats"] and state["images_seen"] == 2
    resumed = recipe(overrides, resume_dir=str(saved[1]), report=keeper("resumed", again))
    assert resumed.step == 1 and resumed.state.ddpo_stats == state["ddpo_stats"]
    resumed.train()
    for name in (LORA_WEIGHTS_NAME, OPTIMIZER_FILE):
        expected, got = load_file(saved[3] / name), load_file(again[3] / name)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    resumed_stats, unbroken_stats = (json.loads((run[3] / STATE_FILE).read_text())["ddpo_stats"]
                                     for run in (again, saved))
    assert resumed_stats == unbroken_stats


@pytest.mark.slow
def test_a_short_ddpo_run_raises_a_non_differentiable_reward_on_the_toy_world(deepspeed_world):
    """DDPO trains on the true JPEG size (no gradient): the RL baseline's own use case."""
    prompt = "three red squares on a white background"
    r = recipe(["trainer.algorithm=ddpo", "sampling.eta=1.0", "sampling.num_steps=10", "truncation.k=10",
                "rewards=[{name: jpeg_size}]", "ddpo.per_prompt_stats=false", "trainer.batch_size=16",
                "trainer.prompt_file=null", f"trainer.prompts=[{prompt}]"], preset="toy-compress")
    rewards = [r.train_step(step)["reward/total_mean"] for step in range(8)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.03, rewards  # kB; measured −1.58 → −1.47 at batch 32


def test_algorithm_keys_are_validated_before_anything_runs():
    with pytest.raises(ConfigError,
                       match=r"^trainer.algorithm: got 'ppo'; accepted: alignprop, ddpo, grpo, refl, draft_lv, drtune, "
                       r"direct_align$"):
        load_config("tiny-cpu", ["trainer.algorithm=ppo"])
    with pytest.raises(ConfigError, match=r"^sampling.eta: got 0 with trainer.algorithm=ddpo; accepted: 0 < eta <= 1"):
        load_config("toy-count", ["trainer.algorithm=ddpo"])
    with pytest.raises(ConfigError, match=r"^trainer.algorithm: ddpo needs a stochastic DDIM sampler"):
        load_config("tiny-sd3-cpu", ["trainer.algorithm=ddpo", "sampling.eta=1.0"])
    accepted = r"accepted: 0 <= low <= high <= sampling.num_steps - 1 \(9\)$"
    with pytest.raises(ConfigError, match=r"^refl.low: got low=5, high=3; " + accepted):
        load_config("tiny-cpu", ["trainer.algorithm=refl", "refl.low=5", "refl.high=3"])
    with pytest.raises(ConfigError, match=r"^draft_lv.copies: got 0"):
        load_config("tiny-cpu", ["draft_lv.copies=0"])
    with pytest.raises(ConfigError, match=r"^rewards\[0\].name: 'jpeg_size' has no gradient"):
        load_config("tiny-cpu", ["rewards=[{name: jpeg_size}]"])
    cfg = load_config("tiny-cpu", ["trainer.algorithm=ddpo", "rewards=[{name: jpeg_size}]"])
    assert cfg.rewards[0]["name"] == "jpeg_size"
