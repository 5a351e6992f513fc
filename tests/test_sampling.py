"""Truncated backprop through DDIM: where gradients go, which steps keep a graph, K strategies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignprop.platform.config import LoraSection, TruncationSection
from alignprop.platform.models import add_lora
from alignprop.trainers.sampling import decode, draw_k, encode_prompts, grad_window, sample

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


def run(pipe, unet, k, checkpoint_unet=True, seed=0):
    device = torch.device("cpu")
    embeds = encode_prompts(pipe, ["a cat", "a dog"], device)
    negative = encode_prompts(pipe, ["", ""], device)
    return sample(pipe, unet, embeds, negative, N, k, 5.0, 1.0, 32, torch.Generator().manual_seed(seed),
                  checkpoint_unet=checkpoint_unet)


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
    assert any(not torch.allclose(truncated[n], deeper[n]) for n in truncated), "an extra step in the window changes the gradient"


def reference_full_backprop(pipe, seed=0):
    """Plain DDIM + CFG with a graph through every step and no checkpointing (the ground truth)."""
    device, sched = torch.device("cpu"), pipe.scheduler
    embeds = encode_prompts(pipe, ["a cat", "a dog"], device)
    negative = encode_prompts(pipe, ["", ""], device)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, 4, 16, 16), generator=generator)
    sched.set_timesteps(N)
    text = torch.cat([negative, embeds])
    for t in sched.timesteps:
        noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
        uncond, cond = noise.chunk(2)
        variance = torch.randn(latents.shape, generator=generator)
        latents = sched.step(uncond + 5.0 * (cond - uncond), t, latents, eta=1.0, variance_noise=variance).prev_sample
    return decode(pipe.vae, latents)


def test_fixed_k_equal_to_n_is_full_backprop(tiny_pipe):
    lora_pipe(tiny_pipe)
    reference = reference_full_backprop(tiny_pipe)
    reference.mean().backward()
    expected = grads(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)
    out = run(tiny_pipe, tiny_pipe.unet, k=N, checkpoint_unet=True)
    torch.testing.assert_close(out.images, reference.detach())
    out.images.mean().backward()
    got = grads(tiny_pipe)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


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
