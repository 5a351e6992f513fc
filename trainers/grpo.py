"""GRPO on diffusion and flow models (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470; DanceGRPO, Xue et al.
2025): the RL baseline of 2025–26, run by the same recipe, launcher, checkpoints and tracking as AlignProp.

    alignprop train --config toy-count-grpo
    alignprop train --config toy-count trainer.algorithm=grpo sampling.eta=1.0

One recipe step (an epoch) = B·accum·workers / G prompts × `grpo.group_size` G images each, sampled by
the stochastic policy (sd/sdxl: DDIM with η = `sampling.eta` > 0, as DanceGRPO; sd3: Flow-GRPO's SDE
form of the flow-matching step at noise level `grpo.sde_noise`, `families.sde_mean_std`), keeping every
step's latents and log-probabilities → rewards → advantages normalised within each group: (r − mean of
the group) / (std + 1e-4), the std of all the step's rewards with `grpo.global_std` (Flow-GRPO's
default) → `grpo.inner_epochs` passes over the sampled micro-batches in a shuffled order, split into
`grpo.updates_per_epoch` optimizer steps; per micro-batch, the first int(N·`grpo.timestep_fraction`)
steps in order, each one backward of

    PPO's clipped surrogate of ratio = exp(log π − log π_old)   +   kl_coef · ‖μ − μ_ref‖² / (2 s²)

with μ_ref the step's mean under the base model (the LoRA adapter switched off), s the step's σ for
DDIM (the exact KL of two Gaussians of one σ) and Flow-GRPO's std_dev_t for sd3. As
yifan123/flow_grpo scripts/train_sd3.py (the training loop, `compute_log_prob`, `stat_tracking.py`).
One difference: Flow-GRPO shuffles single samples across its training batches; here whole sampled
micro-batches are shuffled, so the first update's denoiser calls repeat the sampler's exactly and
its ratio is exactly 1 (`ratio_dev_first`: max |ratio − 1| over the first update, logged).
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from ..platform.models import adapters_disabled
from .ddpo import collect, policy_eta, policy_log_prob, ppo_loss
from .families import Conditioning
from .sampling import guidance_text, guided_prediction


def trained_timesteps(cfg) -> int:
    """Flow-GRPO: int(num_steps · timestep_fraction) steps, the first ones of the trajectory."""
    return max(1, int(cfg.sampling.num_steps * cfg.grpo.timestep_fraction))


def group_advantages(rewards: np.ndarray, group_size: int, global_std: bool) -> np.ndarray:
    """(r − the mean of its group) / (std + 1e-4); groups are consecutive runs of `group_size` rewards
    (one prompt each); std: of all rewards (global_std), else of the group. Flow-GRPO's stat tracker,
    cleared every epoch."""
    groups = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    std = groups.std() if global_std else groups.std(axis=1, keepdims=True)
    return ((groups - groups.mean(axis=1, keepdims=True)) / (std + 1e-4)).reshape(-1)


def advantages_for(recipe, rewards: torch.Tensor) -> torch.Tensor:
    """Every rank's rewards, in (rank, micro-batch, sample) order → group advantages → this rank's share."""
    g = recipe.cfg.grpo
    everything = recipe.gather(rewards.double().reshape(-1, 1))[:, 0].numpy()
    advantages = group_advantages(everything, g.group_size, g.global_std)
    n = len(rewards)
    mine = torch.as_tensor(advantages[recipe.ctx.rank * n:(recipe.ctx.rank + 1) * n], dtype=torch.float32)
    return mine.clamp(-g.adv_clip_max, g.adv_clip_max).to(recipe.ctx.device)


def kl_to_base(mean: torch.Tensor, mean_ref: torch.Tensor, kl_std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO: mean over the batch of ‖μ − μ_ref‖² (averaged over pixels) / (2 s²)."""
    dims = tuple(range(1, mean.ndim))
    return (((mean - mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * kl_std**2)).mean()


def train_step(recipe, step: int) -> dict[str, float]:
    """One GRPO epoch: sample groups, `updates_per_epoch` × `inner_epochs` optimizer steps; metrics over ranks."""
    cfg, g, s, ctx = recipe.cfg, recipe.cfg.grpo, recipe.cfg.sampling, recipe.ctx
    start, eta = time.perf_counter(), policy_eta(cfg, recipe.pipe)
    batch = collect(recipe, step)
    advantages = advantages_for(recipe, batch["rows"][:, 0])
    n_samples, n_steps = batch["x"].shape[:2]
    n_train, size = trained_timesteps(cfg), cfg.trainer.batch_size
    guidance = s.guidance_scale if g.train_cfg else 1.0
    order = random.Random(f"alignprop-grpo/{cfg.trainer.seed}/{step}/{ctx.rank}")
    per_update = (cfg.optim.grad_accum // g.updates_per_epoch) * n_train  # backward calls per optimizer step
    recipe.engine.train()
    calls, info = 0, {"approx_kl": [], "clipfrac": [], "loss": [], "kl": [], "ratio_dev_first": [0.0]}
    for _ in range(g.inner_epochs):
        for chunk in order.sample(range(cfg.optim.grad_accum), cfg.optim.grad_accum):  # micro-batches as sampled
            idx = torch.arange(chunk * size, (chunk + 1) * size)
            pooled = None if batch["pooled"] is None else batch["pooled"][idx]
            text = guidance_text(recipe.engine, Conditioning(batch["embeds"][idx], pooled),
                                 recipe.negative.expand(len(idx)), guidance)
            for j in range(n_train):
                t, x, x_next = batch["timesteps"][j], batch["x"][idx, j], batch["x_next"][idx, j]
                pred = guided_prediction(recipe.pipe, recipe.engine, x, t, text, guidance, s.resolution, None)
                log_prob, mean, kl_std = policy_log_prob(recipe, pred, t, x, x_next, eta)
                ratio = torch.exp(log_prob - batch["log_probs"][idx, j])
                loss = ppo_loss(advantages[idx], ratio, g.clip_range)
                if g.kl_coef > 0:
                    with torch.no_grad(), adapters_disabled(recipe.denoiser):
                        ref = guided_prediction(recipe.pipe, recipe.engine, x, t, text, guidance, s.resolution, None)
                        _, mean_ref, _ = policy_log_prob(recipe, ref, t, x, x_next, eta)
                    kl = kl_to_base(mean, mean_ref, kl_std)
                    loss = loss + g.kl_coef * kl
                    info["kl"].append(float(kl.detach()))
                recipe.engine.backward(loss)
                recipe.engine.step()  # DeepSpeed updates every `per_update` calls
                with torch.no_grad():
                    deviation = float((ratio - 1.0).abs().max())
                    if calls < per_update:  # the first update: on-policy, the sampler's own calls
                        info["ratio_dev_first"].append(deviation)
                    info["approx_kl"].append(float(0.5 * ((log_prob - batch["log_probs"][idx, j]) ** 2).mean()))
                    info["clipfrac"].append(float(((ratio - 1.0).abs() > g.clip_range).float().mean()))
                    info["loss"].append(float(loss))
                calls += 1
    values = recipe.gather(batch["rows"])
    cfg_mult, train_mult = (2 if s.guidance_scale > 1 else 1), (2 if guidance > 1 else 1)
    ref_mult = 2 if g.kl_coef > 0 else 1  # the base model's call beside each trained one
    metrics = recipe.finish_step(values, time.perf_counter() - start, n_samples * ctx.world_size,
                                 n_steps * cfg_mult + g.inner_epochs * n_train * train_mult * ref_mult)
    metrics.update({name: float(np.mean(v)) for name, v in info.items() if v and name != "ratio_dev_first"})
    metrics.update({"k": float(n_train), "ratio_dev_first": max(info["ratio_dev_first"]),
                    "advantage_abs_mean": float(advantages.abs().mean())})
    return metrics

