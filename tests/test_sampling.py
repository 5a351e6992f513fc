"""Truncated backprop through DDIM: where gradients go, which steps keep a graph, K strategies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import math
import random

from torch.utils.checkpoint import checkpoint

from alignprop.platform.config import ConfigError, LoraSection, TruncationSection, load_config
from alignprop.platform.models import add_lora
from alignprop.trainers.sampling import (CheckpointPlan, SamplerSettings, decode, draw_cuts, draw_grad_steps, draw_k,
                                         encode_prompts,
                                         grad_window, sample, saved_bytes, steps_from_cuts)

N = 6


class Recorder(nn.Module):
    """Wraps the UNet; records, per forward call, whether autograd was recording."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls, self.recording = unet, [], True

    def forward(self, *args, **kwargs):
        if self.recording:
            self.calls.append(torch.is_grad_enabled())
        return self.unet(*args, **kwargs)


def lora_pipe(pipe):
    params = add_lora(pipe.unet, LoraSection(rank=4, alpha=4))
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:  # lora_B starts at 0, which leaves lora_A without gradient
            p.data.normal_(0, 0.05)
    return params


def run(pipe, unet, k, checkpoint_unet=True, seed=0, grad_steps=None):
    device = torch.device("cpu")
    embeds = encode_prompts(pipe, ["a cat", "a dog"], device)
    negative = encode_prompts(pipe, ["", ""], device)
    return sample(pipe, unet, embeds, negative, torch.Generator().manual_seed(seed), SamplerSettings(N, 5.0, 1.0, 32),
                  k=k, checkpoint_unet=checkpoint_unet, grad_steps=grad_steps)


def grads(pipe):
    return {n: p.grad.clone() for n, p in pipe.unet.named_parameters() if p.grad is not None}


def test_gradients_reach_every_lora_tensor_and_nothing_else(tiny_pipe):
    params = lora_pipe(tiny_pipe)
    out = run(tiny_pipe, tiny_pipe.unet, k=3)
    out.images.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "every LoRA tensor gets a gradient"
    for module in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder):
        for name, p in module.named_parameters():
            if "lora_" not in name:
                assert p.grad is None, f"frozen parameter {name} received a gradient"


@pytest.mark.parametrize("k", [1, 3, N])
def test_only_the_last_k_steps_keep_a_graph(tiny_pipe, k):
    lora_pipe(tiny_pipe)
    recorder = Recorder(tiny_pipe.unet)
    out = run(tiny_pipe, recorder, k=k)
    recorder.recording = False  # checkpoint recomputation during backward is not a sampling step
    assert recorder.calls == [i >= N - k for i in range(N)]
    assert out.grad_steps == list(range(N - k, N))
    out.images.mean().backward()


def test_steps_before_the_window_contribute_no_gradient(tiny_pipe):
    """Grads with K=2 equal grads of a run whose first N−2 steps are replayed without a graph."""
    lora_pipe(tiny_pipe)
    run(tiny_pipe, tiny_pipe.unet, k=2).images.mean().backward()
    truncated = grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)
    run(tiny_pipe, tiny_pipe.unet, k=3).images.mean().backward()
    deeper = grads(tiny_pipe)
    changed = any(not torch.allclose(truncated[n], deeper[n]) for n in truncated)
    assert changed, "an extra step in the window changes the gradient"


def official_loop(pipe, cuts, seed=0):
    """The official AlignProp / TRL 0.23.1 loop (`pipeline_step_with_grad`): DDIM + CFG over all N
    steps with a full graph and checkpointed UNet calls; step i's noise prediction is detached when
    i < cuts[i]. Fixed K is cuts = [N − K] * N. Noise drawn in sample()'s order (latents, then eta)."""
    device, sched = torch.device("cpu"), pipe.scheduler
    embeds = encode_prompts(pipe, ["a cat", "a dog"], device).embeds
    negative = encode_prompts(pipe, ["", ""], device).embeds
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, 4, 16, 16), generator=generator) * sched.init_noise_sigma
    sched.set_timesteps(N)
    text = torch.cat([negative, embeds])
    with torch.enable_grad():
        for i, t in enumerate(sched.timesteps):
            latent_model_input = sched.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = checkpoint(pipe.unet, latent_model_input, t, text, use_reentrant=False)[0]
            if i < cuts[i]:
                noise_pred = noise_pred.detach()
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + 5.0 * (cond - uncond)
            variance = torch.randn(latents.shape, generator=generator)
            latents = sched.step(noise_pred, t, latents, eta=1.0, variance_noise=variance).prev_sample
    return decode(pipe.vae, latents)


def assert_bitwise_like_official(pipe, cuts, grad_steps):
    reference = official_loop(pipe, cuts)
    reference.mean().backward()
    expected = grads(pipe)
    pipe.unet.zero_grad(set_to_none=True)
    out = run(pipe, pipe.unet, k=None, grad_steps=grad_steps)
    assert torch.equal(out.images, reference.detach()), (out.images - reference).abs().max()
    out.images.mean().backward()
    got = grads(pipe)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        assert torch.equal(got[name], expected[name]), (name, (got[name] - expected[name]).abs().max())


@pytest.mark.parametrize("k", [1, 3, N])
def test_fixed_k_matches_the_official_loop_bitwise(tiny_pipe, k):
    """Our no_grad prefix + checkpointed window = the official full graph with `.detach()` before the window
    (K = N is full backprop through every step)."""
    lora_pipe(tiny_pipe)
    assert_bitwise_like_official(tiny_pipe, [N - k] * N, list(grad_window(N, k)))


def test_per_step_matches_the_official_scattered_loop_bitwise(tiny_pipe):
    """per_step with injected cuts = the official loop with the same per-step `randint` draws."""
    lora_pipe(tiny_pipe)
    cuts = [3, 0, 6, 2, 5, 1]  # kept: i >= cut → steps 1, 3, 5 (scattered; 4 is detached after a kept step)
    steps = steps_from_cuts(cuts)
    assert steps == [1, 3, 5]
    recorder = Recorder(tiny_pipe.unet)
    run(tiny_pipe, recorder, k=None, grad_steps=steps)
    assert recorder.calls == [i in steps for i in range(N)], "only the kept steps' UNet calls record a graph"
    assert_bitwise_like_official(tiny_pipe, cuts, steps)


def test_outer_no_grad_builds_no_graph(tiny_pipe):
    lora_pipe(tiny_pipe)
    with torch.no_grad():
        out = run(tiny_pipe, tiny_pipe.unet, k=N)
    assert not out.images.requires_grad and out.grad_steps == []


@pytest.mark.parametrize("truncation", [
    TruncationSection(strategy="fixed", k=4),
    TruncationSection(strategy="uniform", low=2, high=7),
    TruncationSection(strategy="gaussian", mean=5, std=3, low=1, high=10),
], ids=["fixed", "uniform", "gaussian"])
def test_truncation_draws_k_in_range_once_per_step_and_replayably(truncation):
    ks = [draw_k(truncation, 10, seed=7, step=s) for s in range(200)]
    low, high = (4, 4) if truncation.strategy == "fixed" else (truncation.low, truncation.high)
    assert all(low <= k <= high for k in ks)
    assert ks == [draw_k(truncation, 10, seed=7, step=s) for s in range(200)], "same (seed, step) → same K"
    if truncation.strategy != "fixed":
        assert len(set(ks)) > 3, "the strategy actually varies K"
    for k in set(ks):
        window = list(grad_window(10, k))
        assert window == list(range(10 - k, 10)), "the window is the contiguous last K steps"


def test_k_is_drawn_per_micro_batch_same_on_every_rank_and_after_resume():
    t = TruncationSection(strategy="uniform", low=1, high=50)
    per_micro = [draw_k(t, 50, seed=3, step=5, micro=m) for m in range(8)]
    assert len(set(per_micro)) > 1, "the micro-batches of one optimizer step see different K"
    rank0 = [[draw_grad_steps(t, 50, 3, s, m) for m in range(4)] for s in range(20)]
    random.seed(999)  # another rank / a resumed process: its global RNG state plays no part
    torch.manual_seed(999)
    rank1 = [[draw_grad_steps(t, 50, 3, s, m) for m in range(4)] for s in range(20)]
    assert rank0 == rank1
    resumed = [[draw_grad_steps(t, 50, 3, s, m) for m in range(4)] for s in range(10, 20)]
    assert resumed == rank0[10:], "a run resumed at step 10 replays the same draws"
    assert draw_k(t, 50, 3, 5, 0) != draw_k(t, 50, 4, 5, 0) or draw_k(t, 50, 3, 6, 0) != draw_k(t, 50, 4, 6, 0)


def test_per_step_draws_a_cut_at_every_step_like_randint_0_n():
    t = TruncationSection(strategy="per_step")  # cut_low=0, cut_high=None → N: the official randint(0, 50)
    draws = [draw_cuts(t, 50, 0, s, m) for s in range(100) for m in range(2)]
    assert all(len(c) == 50 and all(0 <= x <= 50 for x in c) for c in draws)
    assert {x for c in draws for x in c} == set(range(51)), "both ends of randint(0, N) are drawn"
    assert draws == [draw_cuts(t, 50, 0, s, m) for s in range(100) for m in range(2)]
    kept = [steps_from_cuts(c) for c in draws]
    assert any(steps != list(range(50 - len(steps), 50)) for steps in kept), "kept steps are scattered"
    # step i keeps a gradient with probability (i + 1) / 51, as in the official code
    for i in (0, 25, 49):
        freq = sum(i in steps for steps in kept) / len(kept)
        assert abs(freq - (i + 1) / 51) < 0.1, (i, freq)
    assert draw_grad_steps(t, 50, 0, 7, 1) == kept[7 * 2 + 1]
    narrow = TruncationSection(strategy="per_step", cut_low=45, cut_high=48)
    assert all(45 <= x <= 48 for s in range(20) for x in draw_cuts(narrow, 50, 0, s))


def test_gaussian_on_the_cut_index_copies_the_official_v2_numbers():
    """Official v2: cut = int(N(42, 5)), redrawn until 1 <= cut < 50; K = 50 − cut (≈ 8)."""
    t = TruncationSection(strategy="gaussian", cut_mean=42, cut_std=5, low=1, high=49)
    ks = [draw_k(t, 50, 0, s, m) for s in range(2000) for m in range(2)]
    assert all(1 <= k <= 49 for k in ks)
    assert 8.7 < sum(ks) / len(ks) < 9.5, sum(ks) / len(ks)  # the official sampler's E[K] ≈ 9.09 (2M draws)
    # redrawn like the official loop, not clipped: K = 1 (cut 49) has ~2.6 % mass, clipping would give ~8 %
    assert sum(k == 1 for k in ks) / len(ks) < 0.05
    on_k = TruncationSection(strategy="gaussian", mean=8, std=5, low=1, high=49)  # the older spelling, on K
    assert 7.0 < sum(draw_k(on_k, 50, 0, s) for s in range(2000)) / 2000 < 10.0


@pytest.mark.parametrize("overrides, field", [
    (["truncation.strategy=per_step", "truncation.cut_low=-1"], "truncation.cut_low"),
    (["truncation.strategy=per_step", "truncation.cut_low=5", "truncation.cut_high=4"], "truncation.cut_low"),
    (["truncation.strategy=per_step", "truncation.cut_high=11"], "truncation.cut_low"),
    (["truncation.strategy=scattered"], "truncation.strategy"),
    (["truncation.strategy=gaussian", "truncation.low=1", "truncation.high=10", "truncation.cut_mean=11"],
     "truncation.cut_mean"),
    (["truncation.strategy=gaussian", "truncation.low=1", "truncation.high=10", "truncation.cut_mean=5",
      "truncation.cut_std=0"], "truncation.cut_std"),
    (["truncation.strategy=gaussian", "truncation.low=1", "truncation.high=10", "truncation.mean=-1"],
     "truncation.mean"),
    (["optim.loss_scale=0"], "optim.loss_scale"),
    (["optim.loss_scale=-0.01"], "optim.loss_scale"),
], ids=["cut_low<0", "cut_low>cut_high", "cut_high>N", "strategy", "cut_mean>N", "cut_std=0", "mean<0", "loss_scale=0",
        "loss_scale<0"])
def test_truncation_and_loss_scale_validation_is_one_line(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", overrides)
    message = str(err.value)
    assert message.startswith(f"{field}: ") and "accepted" in message and "\n" not in message, message


def test_per_step_and_cut_gaussian_configs_load():
    cfg = load_config("tiny-cpu", ["truncation.strategy=per_step"])
    assert (cfg.truncation.cut_low, cfg.truncation.cut_high) == (0, None) and cfg.optim.loss_scale == 1.0
    cfg = load_config("tiny-cpu", ["truncation.strategy=gaussian", "truncation.low=1", "truncation.high=9",
                                   "truncation.cut_mean=8.5", "truncation.cut_std=1.5", "optim.loss_scale=0.01"])
    assert cfg.truncation.cut_mean == 8.5 and cfg.optim.loss_scale == 0.01
    assert math.isfinite(cfg.truncation.cut_std)


@pytest.mark.parametrize("mode, budget_mb", [("none", None), ("auto", None), ("auto", 0.0), (False, None)])
def test_every_checkpoint_mode_gives_the_gradients_of_all(tiny_pipe, mode, budget_mb):
    """sampling.checkpoint_unet none/auto keep activations instead of recomputing them: the same
    gradients, bit for bit on CPU, whatever the budget lets auto keep."""
    params = lora_pipe(tiny_pipe)
    run(tiny_pipe, tiny_pipe.unet, k=4, checkpoint_unet="all").images.mean().backward()
    reference = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    plan = CheckpointPlan(mode, budget_mb)
    out = run(tiny_pipe, tiny_pipe.unet, k=4, checkpoint_unet=plan)
    out.images.mean().backward()
    assert (out.kept, out.recomputed) == (plan.kept, plan.recomputed) and out.kept + out.recomputed == 4
    for p, expected in zip(params, reference):
        assert torch.equal(p.grad, expected)


def test_auto_keeps_what_fits_the_budget_and_checkpoints_the_rest(tiny_pipe):
    """The first call is measured (bytes autograd saves, parameters excluded); the budget then decides."""
    lora_pipe(tiny_pipe)
    assert run(tiny_pipe, tiny_pipe.unet, k=5, checkpoint_unet=CheckpointPlan("auto", 1e6)).kept == 5
    one_call = CheckpointPlan("auto", 1e6)
    run(tiny_pipe, tiny_pipe.unet, k=1, checkpoint_unet=one_call)
    per_call_mb = one_call.kept_bytes / 2**20
    assert 0.1 < per_call_mb < 100, per_call_mb  # the tiny UNet at batch 4 (CFG), 16×16 latents
    plan = CheckpointPlan("auto", 2.5 * per_call_mb)
    out = run(tiny_pipe, tiny_pipe.unet, k=5, checkpoint_unet=plan)
    assert (out.kept, out.recomputed) == (2, 3) and plan.kept_bytes <= 2.5 * per_call_mb * 2**20
    again = run(tiny_pipe, tiny_pipe.unet, k=5, checkpoint_unet=CheckpointPlan("auto", 0.0))
    assert again.kept == 0, "measured already"


def test_saved_bytes_counts_activations_not_parameters():
    layer = nn.Linear(256, 256)
    x = torch.randn(64, 256, requires_grad=True)
    out, counted = saved_bytes(layer, lambda v: torch.relu(layer(v)), x)
    # linear saves its input (64×256) and relu its output (64×256); the weight is a parameter
    assert counted == 2 * 64 * 256 * 4
    with pytest.raises(ValueError, match="sampling.checkpoint_unet: got 'some'; accepted: all, none, auto"):
        CheckpointPlan("some")
