"""Differentiable DDIM sampling with truncated backpropagation (the heart of AlignProp).

The first N−K denoising steps run under `torch.no_grad()`; only the contiguous last K steps keep a
graph, each UNet call wrapped in activation checkpointing, so memory grows with K, not N. K is drawn
ONCE per batch from a generator seeded by (seed, step): every worker uses the same K and a resumed
run replays the same sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from alignprop.platform.config import TruncationSection


def draw_k(truncation: TruncationSection, num_steps: int, seed: int, step: int) -> int:
    """The truncation depth K for optimizer step `step` (same on every rank, replayable)."""
    rng = random.Random(seed * 1_000_003 + step)
    if truncation.strategy == "fixed":
        k = truncation.k
    elif truncation.strategy == "uniform":
        k = rng.randint(truncation.low, truncation.high)
    elif truncation.strategy == "gaussian":
        k = round(rng.gauss(truncation.mean, truncation.std))
        k = min(max(k, truncation.low), truncation.high)
    else:
        raise ValueError(f"truncation.strategy: unknown {truncation.strategy!r}")
    return max(1, min(k, num_steps))


def grad_window(num_steps: int, k: int) -> range:
    """Indices (0-based, in sampling order) of the steps that keep a graph: the last k."""
    return range(num_steps - k, num_steps)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings (frozen), as the UNet's encoder_hidden_states."""
    tokens = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    return pipe.text_encoder(tokens)[0]


@dataclass
class SampleOutput:
    images: torch.Tensor  # B×3×H×W in [0, 1]; differentiable through the window
    latents: torch.Tensor
    grad_steps: list[int]  # the step indices that ran with a graph (for tests and logging)


def sample(
    pipe,
    unet: Callable,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    num_steps: int,
    k: int,
    guidance_scale: float,
    eta: float,
    resolution: int,
    generator: torch.Generator,
    checkpoint_unet: bool = True,
    checkpoint_vae: bool = False,
) -> SampleOutput:
    """DDIM with classifier-free guidance; gradients flow through the last `k` steps only.

    `unet` is the (LoRA-wrapped, possibly DeepSpeed-managed) UNet module; `generator` (on CPU)
    fixes the initial noise and DDIM's eta-noise, so a (seed, step) pair replays exactly.
    """
    scheduler = pipe.scheduler
    device, batch = prompt_embeds.device, prompt_embeds.shape[0]
    unet_dtype = next(unet.parameters()).dtype
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (batch, pipe.unet.config.in_channels, resolution // scale, resolution // scale)
    latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=device)
    text = torch.cat([negative_embeds, prompt_embeds]).to(unet_dtype) if guidance_scale > 1 else prompt_embeds.to(unet_dtype)
    window = grad_window(num_steps, k)
    grad_allowed = torch.is_grad_enabled()  # an outer no_grad (evaluation) wins over the window

    def denoise(latent_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(latent_in, t, encoder_hidden_states=text, return_dict=False)[0]

    for i, t in enumerate(scheduler.timesteps):
        with_graph = grad_allowed and i in window
        with torch.set_grad_enabled(with_graph):
            latent_in = torch.cat([latents] * 2) if guidance_scale > 1 else latents
            latent_in = scheduler.scale_model_input(latent_in, t).to(unet_dtype)
            if with_graph and checkpoint_unet:
                noise = checkpoint(denoise, latent_in, t, use_reentrant=False)
            else:
                noise = denoise(latent_in, t)
            noise = noise.float()
            if guidance_scale > 1:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            variance_noise = torch.randn(latents.shape, generator=generator).to(device) if eta > 0 else None
            latents = scheduler.step(noise, t, latents, eta=eta, variance_noise=variance_noise).prev_sample
    images = decode(pipe.vae, latents, checkpoint_vae)
    return SampleOutput(images=images, latents=latents, grad_steps=list(window) if grad_allowed else [])


def decode(vae, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
    """Latents → images in [0, 1] (differentiable)."""
    z = (latents / vae.config.scaling_factor).to(vae.dtype)

    def run(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, return_dict=False)[0]

    pixels = checkpoint(run, z, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else run(z)
    return (pixels.float() / 2 + 0.5).clamp(0, 1)
