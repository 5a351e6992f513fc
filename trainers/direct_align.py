"""Direct-Align (SRPO: Shen et al., "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human
Preference", arXiv 2509.06942) as `trainer.algorithm=direct_align`: the reward's gradient reaches any
sampling step, early (high-noise) ones included, through one denoiser call at the memory of one call.

    alignprop train --config toy-count trainer.algorithm=direct_align direct_align.t_low=0.1 direct_align.t_high=0.5

Per micro-batch: sample x0 without a graph from initial noise ε; draw a sampling index i in
[⌊t_low·N⌋, ⌈t_high·N⌉ − 1]; noise x0 back to step i with that same ε, x_i = a_i·x0 + b_i·ε; take step
i → i + 1 with a graph (the run's guidance); recover x̂0 = (x_{i+1} − b_{i+1}·ε) / a_{i+1} with the
known noise at the level the step lands on (`families.noise_coefficients`); reward on decode(x̂0).
With a denoiser that predicts the injected noise exactly, x̂0 = x0.
From Tencent-Hunyuan/SRPO fastvideo/SRPO.py @81e5898 (FLUX):
    L548  noisy = sigmas * noise + (1.0 - sigmas) * latent_start      # the rollout's own initial noise
    L555  latents = noisy.detach()
    L605  latents = latents.to(torch.float32) + dsigma * pred           # one Euler step with a graph
    L608  latents = (latents - gt_vector) / (1 - sigmast)              # gt_vector = sigmast * noise
Changed: the step goes to the next step of the sampling schedule (SRPO: 101 of 1000 σ-cells between
steps 5 and 25 of a 50-step shift-3 schedule, Δσ ≈ 0.02); the same closed form on DDIM (sd, sdxl) through
(a, b) = (sqrt ᾱ, sqrt(1 − ᾱ)); rewards are the run's own (SRPO's SRP text-conditioned reward and its
inversion branch are not ported; its "discount" is the SRP coefficient k of (1 + k)·pos − neg, not a
weight on the reward, so there is none to port).
"""

from __future__ import annotations

import math
import random

import torch

from .families import family_of
from .sampling import (SamplerSettings, base_step_kl, decode, encode_prompts, guidance_text, guided_prediction,
                       initial_noise)


def step_index(cfg, step: int, micro: int) -> int:
    """The trained sampling index for (optimizer step, micro-batch), the same on every rank."""
    n, d = cfg.sampling.num_steps, cfg.direct_align
    rng = random.Random(f"alignprop-direct-align/{cfg.trainer.seed}/{step}/{micro}")
    return rng.randint(int(d.t_low * n), math.ceil(d.t_high * n) - 1)


def recover_x0(pipe, pred: torch.Tensor, i: int, x_i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Step i → i + 1 from x_i with prediction `pred`, then x̂0 from the known noise at i + 1's level."""
    family, scheduler = family_of(pipe), pipe.scheduler
    x_next = family.step_at(scheduler, pred, i, x_i)
    a, b = (c.to(x_next.device, x_next.dtype) for c in family.noise_coefficients(scheduler, i, after=True))
    return (x_next - b * noise) / a


def train_images(recipe, prompts: list[str], step: int, micro: int, kl_terms=None):
    """(images of x̂0 with a graph through one call, prompts, 1, denoiser evaluations per image)."""
    cfg, s, pipe = recipe.cfg, recipe.cfg.sampling, recipe.pipe
    generator = recipe.generator(step, micro, recipe.ctx.rank)
    embeds = encode_prompts(pipe, prompts, recipe.ctx.device)
    replay = torch.Generator().set_state(generator.get_state())  # the rollout's own initial noise: ε
    noise = initial_noise(pipe, len(prompts), s.resolution, replay, recipe.ctx.device)
    with torch.no_grad():
        x0 = recipe.sample(prompts, generator, embeds=embeds).latents
    i = step_index(cfg, step, micro)
    family, scheduler = family_of(pipe), pipe.scheduler
    a, b = (c.to(x0.device, x0.dtype) for c in family.noise_coefficients(scheduler, i))
    x_i = (a * x0 + b * noise).detach()
    text = guidance_text(recipe.engine, embeds, recipe.negative.expand(len(prompts)), s.guidance_scale)
    t, plan = scheduler.timesteps[i], recipe.checkpoint_plan()
    pred = guided_prediction(pipe, recipe.engine, x_i, t, text, s.guidance_scale, s.resolution, plan)
    if kl_terms is not None:
        kl_terms.append(base_step_kl(pipe, recipe.engine, x_i, t, text, pred, SamplerSettings.of(s)))
    images = decode(pipe.vae, recover_x0(pipe, pred, i, x_i, noise), s.checkpoint_vae)
    per_call = 2 if s.guidance_scale > 1 else 1
    return images, prompts, 1, (s.num_steps + 1 + plan.recomputed + len(kl_terms or ())) * per_call
