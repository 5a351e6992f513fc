"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"): the RL baseline
AlignProp claims to beat, run by the same recipe, launcher, checkpoints and tracking.

    alignprop train --config toy-count trainer.algorithm=ddpo
    alignprop train --config sd15-aesthetic-ddpo

One recipe step (an epoch) = sample a batch with stochastic DDIM (η = `sampling.eta`), keeping every
step's latents and log-probabilities → score it with any reward (no gradient needed: `jpeg_size`
trains) → advantages from per-prompt running statistics (or the batch's) → `ddpo.inner_epochs` passes
over the shuffled batch, each split into `ddpo.updates_per_epoch` optimizer steps (the later ones are
off-policy: PPO's ratio and clip act): for every sample, the steps of a per-sample shuffled order
(`ddpo.timestep_fraction` of them), the PPO-clipped importance-ratio loss on the recomputed
log-probability of the stored next latents. As kvablack/ddpo-pytorch `scripts/train.py` (and TRL ≤
0.23.1's `DDPOTrainer`); the log-probability is its `ddim_step_with_logprob` (diffusers' DDIM
mean and σ_t = η·sqrt(variance)), per-sample timesteps allowed. `trainer.images_per_prompt` m
draws B/m prompts × m samples, so per-prompt statistics exist on small prompt sets.

`collect` and `gaussian_log_prob`/`ppo_loss` are shared with GRPO (trainers/grpo.py).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque

import numpy as np
import torch

from .families import Conditioning, family_of
from .sampling import SamplerSettings, base_step_kl, encode_prompts, guidance_text, guided_prediction


def trained_timesteps(cfg) -> int:
    """The trained share of each trajectory's steps; DDPO calls backward once per trained timestep
    (ddpo-pytorch: accumulation × num_train_timesteps), so DeepSpeed accumulates over them."""
    return max(1, int(cfg.sampling.num_steps * cfg.ddpo.timestep_fraction))


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, std²), averaged over all but the batch dimension (as ddpo-pytorch)."""
    log_prob = -((x_next.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ppo_loss(advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate: mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε)))."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


class PerPromptStatTracker:
    """ddpo-pytorch `stat_tracking.py`: each prompt's last `buffer_size` rewards; below `min_count`
    of them the batch's mean and std stand in. JSON-able state for checkpoints."""

    def __init__(self, buffer_size: int, min_count: int, state: dict | None = None):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats = {p: deque(v, maxlen=buffer_size) for p, v in (state or {}).items()}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            prompt_rewards = rewards[prompts == prompt]
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(prompt_rewards.tolist())
            if len(buffer) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages

    def state(self) -> dict:
        return {p: list(v) for p, v in self.stats.items()}


def advantages_for(recipe, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Every rank's (prompt, reward) pairs → the same advantages everywhere → this rank's share."""
    rows = recipe.gather(torch.stack([prompt_ids.double(), rewards.double()], dim=1))
    prompts = [recipe.prompts[int(i)] for i in rows[:, 0]]
    d = recipe.cfg.ddpo
    if d.per_prompt_stats:  # the buffers live in the recipe's checkpointed state, as JSON
        tracker = PerPromptStatTracker(d.stats_buffer, d.stats_min_count, recipe.state.ddpo_stats)
        all_adv = tracker.update(prompts, rows[:, 1].numpy())
        recipe.state.ddpo_stats = tracker.state()
    else:
        values = rows[:, 1].numpy()
        all_adv = (values - values.mean()) / (values.std() + 1e-8)
    n = len(rewards)
    mine = torch.as_tensor(all_adv[recipe.ctx.rank * n:(recipe.ctx.rank + 1) * n], dtype=torch.float32)
    return mine.clamp(-d.adv_clip_max, d.adv_clip_max).to(recipe.ctx.device)


def policy_eta(cfg, pipe) -> float:
    """The noise of the policy's sampler: DDIM's η (sampling.eta), or for GRPO on sd3 the SDE's noise level."""
    return cfg.grpo.sde_noise if cfg.trainer.algorithm == "grpo" and family_of(pipe).name == "sd3" else cfg.sampling.eta


def policy_log_prob(recipe, pred, t, x, x_next, eta: float):
    """(log π(x_next | x_t), the policy step's mean, the σ of GRPO's KL term) for per-sample or one `t`."""
    mean, std, kl_std = family_of(recipe.pipe).policy_mean_std(recipe.pipe.scheduler, pred, t, x, eta)
    return gaussian_log_prob(x_next, mean, std), mean, kl_std


@torch.no_grad()
def collect(recipe, step: int) -> dict:
    """grad_accum micro-batches of stochastic trajectories (DDIM, or sd3's SDE) with log-probs and rewards."""
    cfg, s, ctx = recipe.cfg, recipe.cfg.sampling, recipe.ctx
    eta = policy_eta(cfg, recipe.pipe)
    settings = SamplerSettings(s.num_steps, s.guidance_scale, eta, s.resolution, s.checkpoint_vae)
    recipe.engine.eval()
    parts, rows = {"prompt_ids": [], "embeds": [], "pooled": [], "x": [], "x_next": [], "log_probs": []}, []
    for micro in range(cfg.optim.grad_accum):
        prompts = recipe.pick_prompts(step, micro)
        trajectory: list = []
        cond = encode_prompts(recipe.pipe, prompts, ctx.device)
        # fold=None: the recorded log-probabilities are the wrapped policy's own, as the update recomputes them,
        # so the first update's PPO ratio is exactly 1 (Flow-GRPO's clip range is 1e-4; a folded rollout's
        # rounding would be clipped, most of all in bf16)
        out = recipe.sample(prompts, recipe.generator(step, micro, ctx.rank), embeds=cond, trajectory=trajectory,
                            settings=settings, fold=None)
        total, components = recipe.rewards(out.images, prompts, gather=recipe.gather)
        rows.append(torch.stack([total, *components.values()], dim=1).float().cpu())
        timesteps = torch.stack([t for t, *_ in trajectory])
        log_probs = [policy_log_prob(recipe, pred, t, x, x_next, eta)[0] for t, x, pred, x_next in trajectory]
        parts["prompt_ids"].append(torch.tensor([recipe.prompts.index(p) for p in prompts]))
        parts["embeds"].append(cond.embeds)
        parts["pooled"].append(cond.pooled)
        parts["x"].append(torch.stack([x for _, x, _, _ in trajectory], dim=1))  # B×T×C×h×w
        parts["x_next"].append(torch.stack([xn for *_, xn in trajectory], dim=1))
        parts["log_probs"].append(torch.stack(log_probs, dim=1))  # B×T
    batch = {k: (torch.cat(v) if v[0] is not None else None) for k, v in parts.items()}
    batch["timesteps"], batch["rows"] = timesteps, torch.cat(rows)
    return batch


def train_step(recipe, step: int) -> dict[str, float]:
    """`updates_per_epoch` DDPO optimizer steps per inner epoch over a freshly sampled batch; metrics over
    ranks (`ratio_dev_first`: max |ratio − 1| over the first update, 0 when it is on-policy)."""
    cfg, d, s, ctx = recipe.cfg, recipe.cfg.ddpo, recipe.cfg.sampling, recipe.ctx
    start, eta = time.perf_counter(), policy_eta(cfg, recipe.pipe)
    batch = collect(recipe, step)
    advantages = advantages_for(recipe, batch["prompt_ids"], batch["rows"][:, 0])
    n_samples, n_steps = batch["x"].shape[:2]
    n_train = trained_timesteps(cfg)
    guidance = s.guidance_scale if d.train_cfg else 1.0
    order = random.Random(f"alignprop-ddpo/{cfg.trainer.seed}/{step}/{ctx.rank}")
    per_update = (cfg.optim.grad_accum // d.updates_per_epoch) * n_train  # backward calls per optimizer step
    policy = SamplerSettings(s.num_steps, guidance, eta, s.resolution)  # the trained step, for optim.kl_coef
    recipe.engine.train()
    kl, clipfrac, losses, first_update, to_base = [], [], [], [0.0], []
    for _ in range(d.inner_epochs):
        samples = order.sample(range(n_samples), n_samples)  # shuffled samples, then per-sample step orders
        step_orders = torch.tensor([order.sample(range(n_steps), n_steps) for _ in range(n_samples)])
        for first in range(0, n_samples, cfg.trainer.batch_size):
            idx = torch.tensor(samples[first:first + cfg.trainer.batch_size])
            pooled = None if batch["pooled"] is None else batch["pooled"][idx]
            text = guidance_text(recipe.engine, Conditioning(batch["embeds"][idx], pooled),
                                 recipe.negative.expand(len(idx)), guidance)
            for j in range(n_train):
                which = step_orders[idx, j]
                t = batch["timesteps"][which]
                x, x_next = batch["x"][idx, which], batch["x_next"][idx, which]
                pred = guided_prediction(recipe.pipe, recipe.engine, x, t, text, guidance, s.resolution, None)
                log_prob = policy_log_prob(recipe, pred, t, x, x_next, eta)[0]
                old = batch["log_probs"][idx, which]
                ratio = torch.exp(log_prob - old)
                loss = ppo_loss(advantages[idx], ratio, d.clip_range)
                if cfg.optim.kl_coef > 0:  # β · KL of the trained steps to the base model's
                    step_kl = base_step_kl(recipe.pipe, recipe.engine, x, t, text, pred, policy).mean()
                    loss = loss + cfg.optim.kl_coef * step_kl
                    to_base.append(float(step_kl.detach()))
                recipe.engine.backward(loss)
                recipe.engine.step()  # DeepSpeed updates every grad_accum / updates_per_epoch × n_train calls
                with torch.no_grad():
                    if len(kl) < per_update:
                        first_update.append(float((ratio - 1.0).abs().max()))
                    kl.append(float(0.5 * ((log_prob - old) ** 2).mean()))
                    clipfrac.append(float(((ratio - 1.0).abs() > d.clip_range).float().mean()))
                    losses.append(float(loss))
    values = recipe.gather(batch["rows"])
    cfg_mult, train_mult = (2 if s.guidance_scale > 1 else 1), (2 if guidance > 1 else 1)
    metrics = recipe.finish_step(values, time.perf_counter() - start, n_samples * ctx.world_size,
                                 n_steps * cfg_mult + d.inner_epochs * n_train * train_mult * (2 if to_base else 1))
    metrics.update({"loss": float(np.mean(losses)), "k": float(n_train), "approx_kl": float(np.mean(kl)),
                    "clipfrac": float(np.mean(clipfrac)), "advantage_abs_mean": float(advantages.abs().mean()),
                    "ratio_dev_first": max(first_update)})
    if to_base:
        metrics["kl"] = float(np.mean(to_base))
    return metrics
