"""Reward gradients into early denoising steps (issue: DRTune and Direct-Align beside AlignProp).

DRTune (trainers/drtune.py): the trained steps are FlowBP's evenly spaced indices; with the inputs detached,
the gradient equals the sum over the trained calls of each call's parameter gradient weighted by the
reward's gradient at its output (a hand-written loop). Direct-Align (trainers/direct_align.py): the noising
is the scheduler's own q(x_t | x0), and when the denoiser predicts the injected noise, x̂0 is x0 exactly."""

from __future__ import annotations

import pytest
import torch

from alignprop.platform.config import ConfigError, ModelSection, load_config
from alignprop.platform.models import load_pipeline
from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext
from alignprop.trainers.direct_align import recover_x0, step_index
from alignprop.trainers.drtune import train_step_indices
from alignprop.trainers.families import denoiser_of, family_of
from alignprop.trainers.sampling import (SamplerSettings, decode, encode_prompts, guidance_text, guided_prediction,
                                         initial_noise, negative_prompt, sample)

from test_families import PROMPTS, with_lora

CPU, N = torch.device("cpu"), 6


def flowbp_indices(total_steps: int, num_train_steps: int, start: int) -> list[int]:
    """RuoyuWang-2077/FlowBP flowbp/trainers/flux1/drtune.py @34c93f9 `_sample_equally_spaced_train_indices`,
    with its random start passed in."""
    stride = max(1, total_steps // num_train_steps)
    max_start = total_steps - 1 - (num_train_steps - 1) * stride
    assert 0 <= start <= max_start
    return [int(start + i * stride) for i in range(num_train_steps)]


@pytest.mark.parametrize("n,k", [(10, 3), (50, 5), (10, 10), (7, 1), (25, 3)])
def test_drtune_steps_are_flowbps_evenly_spaced_indices_with_a_random_start(n, k):
    seen, max_start = set(), n - 1 - (k - 1) * max(1, n // k)
    for step in range(40):
        steps = train_step_indices(n, k, seed=0, step=step)
        assert steps == flowbp_indices(n, k, steps[0]) and len(steps) == k and 0 <= steps[0] and steps[-1] < n
        assert steps == train_step_indices(n, k, seed=0, step=step), "a pure function of (seed, step, micro)"
        seen.add(steps[0])
    assert len(seen) > 1 if max_start > 0 else seen == {0}, "the offset is drawn where there is room"


def chain(pipe, model, latents, text, settings, trained, eps_leaves=None):
    """The DDIM chain written out with diffusers' scheduler.step: every call's input detached; trained calls
    keep their graph. With `eps_leaves`, every prediction is replaced by a leaf tensor (its value) and kept."""
    scheduler = pipe.scheduler
    family_of(pipe).set_timesteps(pipe, settings.num_steps, CPU, latents.shape)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i in trained):
            eps = guided_prediction(pipe, model, latents.detach(), t, text, settings.guidance_scale,
                                    settings.resolution, None)
        if eps_leaves is not None:
            eps = eps.detach().requires_grad_(True)
            eps_leaves.append(eps)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    return decode(pipe.vae, latents)


def test_drtune_gradient_is_the_sum_of_per_call_gradients_with_the_inputs_detached():
    pipe = load_pipeline(ModelSection(tiny=True))
    params = with_lora(pipe, scale=0.2)
    model = denoiser_of(pipe)
    settings, trained = SamplerSettings(N, 5.0, 0.0, 32), [1, 3, 5]
    embeds, negative = encode_prompts(pipe, PROMPTS, CPU), negative_prompt(pipe, len(PROMPTS), CPU)
    text = guidance_text(model, embeds, negative, settings.guidance_scale)

    def ours(stop_input_grad):
        out = sample(pipe, model, embeds, negative, torch.Generator().manual_seed(0), settings, k=len(trained),
                     grad_steps=trained, checkpoint_unet="none", stop_input_grad=stop_input_grad)
        return torch.autograd.grad(out.images.square().mean(), params)

    drtune = ours(True)
    # the reference: dL/dε_s through the linear chain, then Σ_s (dL/dε_s)ᵀ ∂ε_s/∂θ, one call at a time
    leaves, x_T = [], initial_noise(pipe, len(PROMPTS), 32, torch.Generator().manual_seed(0), CPU)
    loss = chain(pipe, model, x_T, text, settings, trained=(), eps_leaves=leaves).square().mean()
    upstream = torch.autograd.grad(loss, leaves)
    family_of(pipe).set_timesteps(pipe, N, CPU, x_T.shape)
    latents, total = x_T, [torch.zeros_like(p) for p in params]
    for i, t in enumerate(pipe.scheduler.timesteps):
        with torch.set_grad_enabled(i in trained):
            eps = guided_prediction(pipe, model, latents, t, text, settings.guidance_scale, 32, None)
        if i in trained:
            for acc, g in zip(total, torch.autograd.grad(eps, params, grad_outputs=upstream[i])):
                acc += g
        latents = pipe.scheduler.step(eps.detach(), t, latents, eta=0.0).prev_sample
    for got, want in zip(drtune, total):
        assert float((got - want).norm()) <= 1e-4 * float(want.norm()) and float(want.norm()) > 0
    full = ours(False)  # the same steps chained through their inputs: another gradient
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(full, drtune)) > 1e-3


@pytest.mark.parametrize("model_dir", ["tiny", "tiny-sd3", "toy-world"])
def test_direct_align_noises_as_the_scheduler_and_recovers_x0_from_the_noise_it_injected(model_dir):
    section = {"tiny": ModelSection(tiny=True), "tiny-sd3": ModelSection(tiny=True, family="sd3"),
               "toy-world": ModelSection(pretrained="toy-world")}[model_dir]
    pipe = load_pipeline(section)
    family, scheduler = family_of(pipe), pipe.scheduler
    generator = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(2, 4, 4, 4, generator=generator) for _ in range(2))
    family.set_timesteps(pipe, N, CPU, x0.shape)
    for i in range(N):
        t = scheduler.timesteps[i]
        a, b = family.noise_coefficients(scheduler, i)
        x_i = a * x0 + b * eps
        if family.name == "sd3":  # flow_grpo / SRPO: noisy = sigma * noise + (1 - sigma) * latent_start
            sigma = scheduler.sigmas[i]
            torch.testing.assert_close(x_i, sigma * eps + (1 - sigma) * x0)
            perfect = eps - x0  # v
        else:
            torch.testing.assert_close(x_i, scheduler.add_noise(x0, eps, t.reshape(1)))
            perfect = scheduler.get_velocity(x0, eps, t.reshape(1)) if \
                scheduler.config.prediction_type == "v_prediction" else eps
        torch.testing.assert_close(recover_x0(pipe, perfect, i, x_i, eps), x0, atol=1e-4, rtol=1e-4)
        wrong = recover_x0(pipe, perfect + 1.0, i, x_i, eps)
        assert float((wrong - x0).abs().max()) > 1e-4, "a wrong prediction does not recover x0"


def test_direct_align_trains_one_call_anywhere_in_the_window_and_gradients_reach_lora(deepspeed_world):
    cfg = load_config("tiny-cpu", ["trainer.algorithm=direct_align", "sampling.num_steps=10", "trainer.eval_every=0",
                                   "direct_align.t_low=0.0", "direct_align.t_high=0.3", "trainer.max_steps=2",
                                   "deepspeed.zero_stage=1", "optim.lr=1e-3", "sampling.checkpoint_unet=none"])
    assert {step_index(cfg, s, 0) for s in range(60)} == {0, 1, 2}
    r = AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()
    calls = []
    r.engine.module.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    before = [p.detach().clone() for _, p in r.lora_parameters()]
    metrics = r.train_step(0)
    assert calls.count(True) == 1 and len(calls) == 11, "the rollout's 10 calls without a graph, one with"
    per_step = cfg.trainer.batch_size * cfg.optim.grad_accum
    assert metrics["k"] == 1 and metrics["unet_evals"] > 0 and metrics["images_seen"] == per_step
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, r.lora_parameters()))


@pytest.mark.parametrize("family_preset", ["tiny-cpu", "tiny-sd3-cpu"])
def test_drtune_runs_through_the_recipe_with_the_common_x_axis(family_preset, deepspeed_world):
    cfg = load_config(family_preset, ["trainer.algorithm=drtune", "drtune.train_steps=2", "sampling.num_steps=6",
                                      "truncation.k=6", "trainer.eval_every=0", "deepspeed.zero_stage=1",
                                      "trainer.max_steps=1", "sampling.checkpoint_unet=none"])
    r = AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()
    calls = []
    r.engine.module.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    metrics = r.train_step(0)
    expected = train_step_indices(6, 2, cfg.trainer.seed, 0)
    assert [i for i, graph in enumerate(calls[:6]) if graph] == expected and metrics["k"] == 2
    assert {"images_seen", "unet_evals", "wall_s"} <= set(metrics)


def test_bad_drtune_and_direct_align_settings_are_one_line_errors():
    load_config("tiny-cpu", ["sampling.num_steps=2", "truncation.k=1"])  # another algorithm ignores both sections
    with pytest.raises(ConfigError, match=r"drtune\.train_steps: got 11; accepted: 1 <= train_steps <= "):
        load_config("tiny-cpu", ["trainer.algorithm=drtune", "drtune.train_steps=11", "sampling.num_steps=10"])
    with pytest.raises(ConfigError, match=r"direct_align\.t_low: got t_low=0.5, t_high=0.5"):
        load_config("tiny-cpu", ["trainer.algorithm=direct_align", "direct_align.t_low=0.5", "direct_align.t_high=0.5"])
