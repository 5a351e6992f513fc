"""DRTune (Wu et al., "Deep Reward Supervision for Tuning Text-to-Image Diffusion Models", ECCV 2024,
arXiv 2405.00760) as `trainer.algorithm=drtune`: the reward's gradient reaches K = `drtune.train_steps`
denoiser calls spread evenly over the N-step chain (early, high-noise ones included), and every call's
input x_t is detached (`drtune.stop_input_grad`), so the gradient flows back through the sampler's
linear updates x_{t-1} = a·x_t + c·ε_θ(sg(x_t)) only: no Jacobian products of the denoiser across steps.
Memory grows with K (the kept calls, checkpointed as AlignProp's window), not with N.

    alignprop train --config toy-count trainer.algorithm=drtune drtune.train_steps=3

The trained steps, per (optimizer step, micro-batch) and the same on every rank: stride ⌊N/K⌋, a random
start in [0, N − 1 − (K − 1)·stride], then start + j·stride — as the unofficial re-implementation
RuoyuWang-2077/FlowBP flowbp/trainers/flux1/drtune.py `_sample_equally_spaced_train_indices` @34c93f9
(no official code is public). Changed: no early stop (FlowBP stops at a random step of the last 40 % and
scores its x̂0; here the chain runs to the end, as the paper's deep supervision of the final image).
"""

from __future__ import annotations

import random


def train_step_indices(num_steps: int, k: int, seed: int, step: int, micro: int = 0) -> list[int]:
    """The K sampling indices (0-based) that keep a graph: evenly spaced by ⌊N/K⌋ from a random start."""
    rng = random.Random(f"alignprop-drtune/{seed}/{step}/{micro}")
    stride = max(1, num_steps // k)
    start = rng.randint(0, num_steps - 1 - (k - 1) * stride)
    return [start + j * stride for j in range(k)]


def train_images(recipe, prompts: list[str], step: int, micro: int, kl_terms=None):
    """(images with a graph through the K calls, prompts, K, denoiser evaluations per image)."""
    cfg, s = recipe.cfg, recipe.cfg.sampling
    steps = train_step_indices(s.num_steps, cfg.drtune.train_steps, cfg.trainer.seed, step, micro)
    out = recipe.sample(prompts, recipe.generator(step, micro, recipe.ctx.rank), k=len(steps), grad_steps=steps,
                        kl_terms=kl_terms, stop_input_grad=cfg.drtune.stop_input_grad)
    per_call = 2 if s.guidance_scale > 1 else 1
    return out.images, prompts, len(steps), (s.num_steps + out.recomputed + len(kl_terms or ())) * per_call
