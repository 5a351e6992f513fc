"""The AlignProp recipe, one worker's view: setup → train step → evaluate → save/load checkpoint → train.
`trainer.algorithm` picks the train step: alignprop (below), refl and draft_lv (a few lines each in
`train_images`), drtune (trainers/drtune.py), direct_align (trainers/direct_align.py), ddpo
(trainers/ddpo.py), grpo (trainers/grpo.py); the rest of the lifecycle is shared.

Run through Ray Train (one copy per worker) by `alignprop train --config tiny-cpu`; the recipe itself
knows nothing of Ray: it gets a `WorkerContext` (rank, device, report(), the checkpoint to resume).

Per micro-batch of an optimizer step: draw K from (seed, step, micro-batch) → sample N DDIM steps
with CFG, the last K with a graph and checkpointed UNet calls (or, `truncation.strategy=per_step`,
the official code's scattered steps) → decode → weighted rewards → loss = −mean(reward) →
DeepSpeed backward of loss × `optim.loss_scale`/step (gradient clipping, accumulation, ZeRO 0–2).

The pieces it is built from: `engine.py` (DeepSpeed, precision, gathering), `state.py` (the persisted
counters), `ema.py`, `sampling.py` (the truncated sampler), `checkpoint.py` (the engine's safetensors
state), `perf.py` (the `perf:` switches).
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..platform.config import RunConfig, read_prompt_file, refl_bounds
from ..platform.console import progress_bar
from ..platform.errors import NonFiniteError
from ..platform.models import LoraFold, add_lora, load_pipeline, lora_delta_norm, lora_scaled, save_lora
from ..platform.tracking import Tracker
from ..rewards import build_rewards
from ..rewards.toy import proxy_errors
from . import ddpo, direct_align, drtune, grpo
from .checkpoint import UnsafeCheckpointError, check_checkpoint_files  # noqa: F401 (re-export)
from .checkpoint import load_engine_state, save_engine_state
from .checkpoint_integrity import write_manifest
from .ema import LoraEMA
from .metrics import diversity
from .engine import broadcast_flag, build_engine, gather_rows, peak_memory_mb, resolve_precision
from .engine import single_process_world  # noqa: F401 (re-export: bench, gpu-check and tests build worlds with it)
from .families import denoiser_of
from .perf import apply_perf, autocast, compiled_prefix, compute_dtype
from .sampling import (CheckpointPlan, SamplerSettings, base_step_kl, draft_lv_images, draw_grad_steps,
                       encode_prompts, guidance_text, negative_prompt, sample)
from .state import STATE_FILE, TrainerState


@dataclass
class WorkerContext:
    """What the launcher (Ray Train, or a plain process in tests/bench) gives one worker."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict, Optional[str]], None] = lambda metrics, checkpoint_dir: None
    resume_dir: Optional[str] = None  # a checkpoint directory written by `save_checkpoint`
    tracking_uri: Optional[str] = None
    run_id: Optional[str] = None
    progress: bool = True
    progress_lines: bool = False  # the driver's console is no terminal (logs, `ray job submit`): lines, no bar


def load_prompts(cfg: RunConfig) -> list[str]:
    """Training prompts: the list, or the prompt file (the launcher reads it on the driver)."""
    return list(cfg.trainer.prompts) if cfg.trainer.prompts else read_prompt_file(cfg.trainer.prompt_file)


def load_eval_prompts(cfg: RunConfig, split: str = "eval") -> list[str]:
    """The held-out prompts (split eval) or the validation prompts (split val): the list, or the file."""
    listed, file = getattr(cfg.trainer, f"{split}_prompts"), getattr(cfg.trainer, f"{split}_prompt_file")
    if listed or not file:
        return list(listed)
    return read_prompt_file(file, f"trainer.{split}_prompt_file")


def group_size(cfg: RunConfig) -> int:
    """Images of one drawn prompt per step: grpo.group_size for GRPO, else trainer.images_per_prompt."""
    return cfg.grpo.group_size if cfg.trainer.algorithm == "grpo" else cfg.trainer.images_per_prompt


def eval_settings(cfg: RunConfig) -> SamplerSettings:
    """The evaluation sampler: the training sampler with trainer.eval_eta / eval_num_steps where set."""
    s, tr = cfg.sampling, cfg.trainer
    return SamplerSettings(s.num_steps if tr.eval_num_steps is None else tr.eval_num_steps, s.guidance_scale,
                           s.eta if tr.eval_eta is None else tr.eval_eta, s.resolution, s.checkpoint_vae)


class AlignPropRecipe:
    def __init__(self, cfg: RunConfig, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx
        self.state = TrainerState(config_name=cfg.name)
        self.ema: Optional[LoraEMA] = None
        self.tracker = Tracker(ctx.tracking_uri, ctx.run_id, enabled=ctx.rank == 0)

    @property
    def step(self) -> int:
        """Optimizer steps completed."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> "AlignPropRecipe":
        cfg, device = self.cfg, self.ctx.device
        torch.manual_seed(cfg.trainer.seed + self.ctx.rank)
        self.pipe = load_pipeline(cfg.model, device).to(device)
        self.denoiser = denoiser_of(self.pipe)  # the UNet (sd, sdxl) or the transformer (sd3)
        lora_params = add_lora(self.denoiser, cfg.lora)
        rl = {"ddpo": (ddpo.trained_timesteps, cfg.ddpo), "grpo": (grpo.trained_timesteps, cfg.grpo)}
        timesteps, section = rl.get(cfg.trainer.algorithm, (lambda _: 1, None))
        self.engine, self.optimizer = build_engine(self.denoiser, lora_params, cfg, device, timesteps(cfg),
                                                   section.updates_per_epoch if section else 1)
        apply_perf(self.pipe, self.denoiser, cfg.perf, device)  # after DeepSpeed's broadcast: contiguous weights
        self.prefix_denoiser = compiled_prefix(self.denoiser, cfg.perf)
        self.fold = LoraFold(self.denoiser) if cfg.perf.lora_prefix == "fold" else None
        dtype = compute_dtype(cfg.perf, resolve_precision(cfg.deepspeed.precision, device))
        self.rewards = build_rewards(cfg.rewards, dtype=dtype).to(device)
        self.eval_rewards = build_rewards(cfg.eval_rewards, dtype=dtype).to(device) if cfg.eval_rewards else None
        self.prompts, self.eval_prompts = load_prompts(cfg), load_eval_prompts(cfg)
        self.val_prompts = load_eval_prompts(cfg, "val")
        self.negative = negative_prompt(self.pipe, 1, device)  # CFG's unconditional input, encoded once
        if cfg.trainer.ema_decay > 0:
            self.ema = LoraEMA(cfg.trainer.ema_decay, self.lora_parameters())
        if self.ctx.resume_dir:
            self.load_checkpoint(self.ctx.resume_dir)
        return self

    # ---------------------------------------------------- what the train steps share
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (reward rows, prompt ids), concatenated in rank order."""
        return gather_rows(rows, self.ctx.world_size, self.ctx.device)

    def generator(self, *parts: int) -> torch.Generator:
        """A CPU generator seeded by (trainer.seed, *parts): the same draws on every replay."""
        return torch.Generator().manual_seed(hash((self.cfg.trainer.seed, *parts)) % 2**63)

    def sample(self, prompts: list[str], generator: torch.Generator, embeds=None,
               settings: Optional[SamplerSettings] = None, **options):
        """`sampling.sample` with the run's settings (or `settings`) and models (options: k, grad_steps,
        stop_at, trajectory, fold: None for the wrapped layers throughout); `embeds`: the prompts'
        conditioning when the caller has it already."""
        embeds = encode_prompts(self.pipe, prompts, self.ctx.device) if embeds is None else embeds
        return sample(self.pipe, self.engine, embeds, self.negative.expand(len(prompts)), generator,
                      settings or SamplerSettings.of(self.cfg.sampling), checkpoint_unet=self.checkpoint_plan(),
                      prefix_denoiser=self.prefix_denoiser, **{"fold": self.fold, **options})

    def checkpoint_plan(self) -> CheckpointPlan:
        return CheckpointPlan(self.cfg.sampling.checkpoint_unet, self.cfg.sampling.activation_budget_mb)

    def autocast(self):
        return autocast(self.cfg.perf, self.ctx.device)

    def pick_prompts(self, step: int, micro: int) -> list[str]:
        """This rank's prompts of (step, micro-batch), drawn with replacement; with groups of m images per
        prompt (`group_size`), the step's B·accum·workers / m prompts (distinct while the set allows) are
        drawn once for all ranks, each m times in a row, and this rank's micro-batch is its slice of them:
        gathered in (rank, micro-batch, sample) order, rows k·m … k·m + m − 1 are one prompt's group."""
        tr, m = self.cfg.trainer, group_size(self.cfg)
        if m == 1:
            pick = random.Random(hash((tr.seed, step, micro, self.ctx.rank)))
            return [pick.choice(self.prompts) for _ in range(tr.batch_size)]
        per_step = tr.batch_size * self.cfg.optim.grad_accum * self.ctx.world_size
        pick, groups = random.Random(f"alignprop-prompts/{tr.seed}/{step}"), per_step // m
        chosen = (pick.sample(self.prompts, groups) if groups <= len(self.prompts)
                  else [pick.choice(self.prompts) for _ in range(groups)])
        start = (self.ctx.rank * self.cfg.optim.grad_accum + micro) * tr.batch_size
        return [chosen[i // m] for i in range(start, start + tr.batch_size)]

    def lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.denoiser.named_parameters() if "lora_" in n]

    # ------------------------------------------------------------------------ train step
    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of `trainer.algorithm`; returns metrics averaged over ranks."""
        if self.cfg.trainer.fail_at_step == step + 1 and not self.ctx.resume_dir:
            raise RuntimeError(f"injected failure at step {step + 1} (trainer.fail_at_step)")
        if self.cfg.trainer.algorithm in ("ddpo", "grpo"):
            return {"ddpo": ddpo, "grpo": grpo}[self.cfg.trainer.algorithm].train_step(self, step)
        return self._reward_gradient_step(step)

    def _reward_gradient_step(self, step: int) -> dict[str, float]:
        """AlignProp, ReFL or DRaFT-LV: grad_accum micro-batches, loss = −mean reward, backward."""
        cfg, start = self.cfg, time.perf_counter()
        self.engine.train()
        rows, ks, evals, kls = [], [], [], []
        for micro in range(cfg.optim.grad_accum):
            prompts = self.pick_prompts(step, micro)
            kl_terms = [] if cfg.optim.kl_coef > 0 else None
            with self.autocast():
                images, scored_prompts, k, per_image = self.train_images(prompts, step, micro, kl_terms)
                # before any running statistics exist, normalised rewards use statistics of all ranks
                total, parts = self.rewards(images, scored_prompts, gather=self.gather)
            ks.append(k)
            evals.append(per_image)
            loss = -total.mean()
            if kl_terms:  # β · the mean per-step KL to the base model (optim.kl_coef)
                kl = torch.stack(kl_terms).mean()
                loss = loss + cfg.optim.kl_coef * kl
                kls.append(float(kl.detach()))
            if not loss.requires_grad:  # per_step may keep no step at all: a zero gradient, as DeepSpeed needs one
                loss = loss + sum(p.sum() for _, p in self.lora_parameters()) * 0.0
            self.engine.backward(loss * cfg.optim.loss_scale)  # metrics report the unscaled loss
            self.engine.step()
            rows.append(torch.stack([total, *parts.values()], dim=1).detach().float().cpu())
        sampled = cfg.trainer.batch_size * cfg.optim.grad_accum * self.ctx.world_size
        metrics = self.finish_step(self.gather(torch.cat(rows)), time.perf_counter() - start, sampled,
                                   sum(evals) / len(evals))
        metrics["k"] = sum(ks) / len(ks)  # mean number of steps that kept a gradient
        if kls:
            metrics["kl"] = sum(kls) / len(kls)
        if min(ks) != max(ks):
            metrics["k_min"], metrics["k_max"] = float(min(ks)), float(max(ks))
        return metrics

    def train_images(self, prompts: list[str], step: int, micro: int, kl_terms: Optional[list] = None):
        """(differentiable images, their prompts, steps with a graph, denoiser evaluations per sampled
        image incl. checkpoint recomputation) for the reward-gradient algorithms; `kl_terms` gets each kept
        step's KL to the base model (sampling.base_step_kl)."""
        cfg, s = self.cfg, self.cfg.sampling
        generator, per_call = self.generator(step, micro, self.ctx.rank), 2 if s.guidance_scale > 1 else 1
        algorithm = cfg.trainer.algorithm
        if algorithm == "refl":  # the stop step per (step, micro-batch), the same on every rank
            stop = random.Random(f"alignprop-refl/{cfg.trainer.seed}/{step}/{micro}").randint(*refl_bounds(cfg))
            out = self.sample(prompts, generator, grad_steps=[stop], stop_at=stop, kl_terms=kl_terms)
            return out.images, prompts, 1, (stop + 1 + out.recomputed + len(kl_terms or ())) * per_call
        if algorithm in ("drtune", "direct_align"):
            return {"drtune": drtune, "direct_align": direct_align}[algorithm].train_images(self, prompts, step, micro,
                                                                                           kl_terms)
        if algorithm == "draft_lv":
            copies, embeds = cfg.draft_lv.copies, encode_prompts(self.pipe, prompts, self.ctx.device)
            with torch.no_grad():
                x0 = self.sample(prompts, generator, embeds=embeds).latents
            plan = self.checkpoint_plan()
            images = draft_lv_images(self.pipe, self.engine, embeds, self.negative.expand(len(prompts)), x0, copies,
                                     generator, SamplerSettings.of(s), checkpoint_unet=plan, kl_terms=kl_terms)
            extra = len(kl_terms or ())
            return images, prompts * copies, 1, (s.num_steps + copies + plan.recomputed + extra) * per_call
        # K (or per_step's cuts) per (step, micro-batch), not per rank: every rank runs the same
        # number of gradient steps, and a resumed run replays the same draws
        grad_steps = draw_grad_steps(cfg.truncation, s.num_steps, cfg.trainer.seed, step, micro)
        out = self.sample(prompts, generator, k=len(grad_steps), grad_steps=grad_steps, kl_terms=kl_terms)
        return out.images, prompts, len(grad_steps), (s.num_steps + out.recomputed + len(kl_terms or ())) * per_call

    def finish_step(self, values: torch.Tensor, seconds: float, sampled: int,
                    evals_per_image: float) -> dict[str, float]:
        """After an update, on every rank: reward statistics, EMA, the common x-axis counters
        (`images_seen`, `unet_evals`, `wall_s`, all ranks) and the metrics of the gathered reward rows."""
        state = self.state
        self.rewards.update_stats(values[:, 1:])  # same numbers on every rank → same normalisation
        if self.ema is not None:
            self.ema.update(self.lora_parameters())
        state.images_seen += sampled
        state.unet_evals += int(round(sampled * evals_per_image))
        state.wall_s += seconds
        metrics = {
            "loss": float(-values[:, 0].mean()),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "step_time_s": seconds,
            "images_per_s": sampled / seconds,
            "peak_memory_mb": peak_memory_mb(self.ctx.device),
            "images_seen": float(state.images_seen),
            "unet_evals": float(state.unet_evals),
            "wall_s": state.wall_s,
        }
        for i, label in enumerate(["total", *self.rewards.labels]):
            metrics[f"reward/{label}_mean"] = float(values[:, i].mean())
            metrics[f"reward/{label}_std"] = float(values[:, i].std()) if len(values) > 1 else 0.0
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    # -------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Rank 0: fixed-seed samples of the held-out prompts (and of the validation prompts, as val/...),
        by the evaluation sampler (`eval_settings`), scored by train and eval rewards; logs the image grid
        and the best adapter. Each of `trainer.eval_lora_scales` other than 1 is scored as eval_lora<scale>/...
        With EMA, the EMA weights are scored too."""
        metrics = self._evaluate_weights(step, "eval")
        if self.val_prompts:
            metrics.update(self._evaluate_weights(step, "val", self.val_prompts))
        for scale in self.cfg.trainer.eval_lora_scales:
            if scale != 1.0:
                with lora_scaled(self.denoiser, scale):
                    metrics.update(self._evaluate_weights(step, f"eval_lora{scale:g}"))
        if metrics[self.cfg.trainer.best_metric] > self.state.best_eval:
            self.state.best_eval = metrics[self.cfg.trainer.best_metric]
            self.tracker.log_lora(lambda d: save_lora(self.denoiser, d), "lora/best")
        if self.ema is not None:
            with self.ema.swapped_in(self.lora_parameters()):
                metrics.update(self._evaluate_weights(step, "eval_ema"))
        return metrics

    def _evaluate_weights(self, step: int, prefix: str, prompt_set: Optional[list[str]] = None) -> dict[str, float]:
        self.engine.eval()
        seeds = self.cfg.trainer.eval_seeds
        prompts = [p for p in prompt_set or self.eval_prompts for _ in range(seeds)]  # each prompt's samples together
        settings, trajectory = eval_settings(self.cfg), ([] if prefix == "eval" else None)
        with self.autocast():
            cond = encode_prompts(self.pipe, prompts, self.ctx.device)
            out = self.sample(prompts, torch.Generator().manual_seed(self.cfg.trainer.eval_seed), embeds=cond,
                              settings=settings, trajectory=trajectory)
            total, parts = self.rewards(out.images, prompts)
            held_out = self.eval_rewards(out.images, prompts)[1] if self.eval_rewards is not None else {}
            kl = self._kl_to_base(trajectory, cond, settings) if trajectory else {}
        metrics = {f"{prefix}/reward_total": float(total.mean())}
        metrics.update({f"{prefix}/{label}": float(v.mean()) for label, v in {**parts, **held_out}.items()})
        if len(prompts) > 1:  # the held-out rewards' standard errors over the samples: a difference's noise
            metrics.update({f"{prefix}/{label}_se": float(v.float().std() / len(v) ** 0.5)
                            for label, v in held_out.items()})
        images = out.images.float()
        drift = {"lora_delta_norm": lora_delta_norm(self.denoiser), **kl,
                 **proxy_errors(self.rewards, self.eval_rewards, images)}
        if seeds > 1:
            drift["diversity"] = diversity(images.view(-1, seeds, *images.shape[1:]))
        metrics.update({f"{prefix}/{name}": value for name, value in drift.items()})
        if prefix != "val":  # the validation split chooses hyperparameters: its numbers suffice
            self.tracker.log_image(out.images, f"{prefix}/samples", step, captions=prompts)
        return metrics

    def _kl_to_base(self, trajectory: list, cond, settings: SamplerSettings) -> dict[str, float]:
        """eval/kl_to_base: the mean over the evaluation trajectory's steps and samples of each step's KL to
        the base model's step from the same x_t (`sampling.base_step_kl`: the Gaussian KL where the evaluation
        sampler is stochastic, the squared prediction difference where it is not); 0 at the base model."""
        text = guidance_text(self.engine, cond, self.negative.expand(cond.batch), settings.guidance_scale)
        steps = [base_step_kl(self.pipe, self.engine, x, t, text, pred, settings).mean()
                 for t, x, pred, _ in trajectory]
        return {"kl_to_base": float(torch.stack(steps).mean())}

    def _should_stop(self, metrics: dict[str, float]) -> bool:
        """Early stopping on a held-out metric; rank 0 decides, every rank learns the verdict."""
        stop = False
        if self.ctx.rank == 0:
            value, record = metrics[self.cfg.trainer.early_stop_metric], self.state.early_stop
            if value > record["best"]:
                record["best"], record["evals_without_best"] = value, 0
            else:
                record["evals_without_best"] += 1
            stop = record["evals_without_best"] >= self.cfg.trainer.early_stop_patience
        return broadcast_flag(stop, self.ctx.world_size, self.ctx.device)

    # ------------------------------------------------------------------ save/load checkpoint
    # safetensors + JSON only, loadable at any world size and ZeRO stage: the engine's part
    # (master weights, AdamW state, counters, RNG) is trainers/checkpoint.py, the rest is here.
    def save_checkpoint(self, directory: str) -> None:
        """Every rank, at the same step (the ZeRO gathers are collective); rank 0 writes the shared
        files, every rank its own RNG state."""
        path, ctx = Path(directory), self.ctx
        path.mkdir(parents=True, exist_ok=True)
        save_engine_state(self.engine, self.lora_parameters(), path, ctx.rank, ctx.world_size, ctx.device)
        if ctx.rank != 0:
            return self._seal(path)
        save_lora(self.denoiser, directory)
        self.state.reward_stats = self.rewards.stats
        (path / STATE_FILE).write_text(self.state.to_json())
        if self.ema is not None:
            self.ema.save(path)
        self._seal(path)

    def _seal(self, path: Path) -> None:
        """This rank's files fsync'd and listed (sizes, sha256) in its manifest, written last."""
        write_manifest(path, self.ctx.rank, [p.name for p in path.iterdir() if not p.name.startswith("manifest_")])

    def load_checkpoint(self, directory: str) -> None:
        """Every rank: refuse anything but .safetensors/.json, then restore this rank's share of the
        engine state (`load_engine_state`), the trainer state and the EMA weights."""
        path = Path(directory)
        load_engine_state(self.engine, self.lora_parameters(), path, self.ctx.rank, self.ctx.device)
        self.state = TrainerState.from_json((path / STATE_FILE).read_text())
        if self.ctx.rank != 0:
            self.state.last_eval = {}  # only rank 0 evaluates
        self.rewards.stats.update(self.state.reward_stats)
        if self.ema is not None:
            self.ema.load(path, self.ctx.device)

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict[str, float]:
        """Steps from the resumed step to max_steps; every rank reports once per step."""
        cfg, state, metrics = self.cfg.trainer, self.state, {}
        if self.ctx.rank == 0 and self.ctx.resume_dir:
            done = state.step >= cfg.max_steps or state.early_stop.get("stopped")
            print(f"[alignprop] resumed at step {state.step} of {cfg.max_steps} from {self.ctx.resume_dir}"
                  + ("; nothing left to train (raise trainer.max_steps, or set tracking.run_name for a new run)"
                     if done else ""), file=sys.__stdout__, flush=True)
        bar = progress_bar(cfg.max_steps, state.step, enabled=self.ctx.rank == 0 and self.ctx.progress,
                           lines=self.ctx.progress_lines)
        if state.step == 0 and cfg.eval_every and self.ctx.rank == 0:  # the base model's baseline
            state.last_eval = self.evaluate(0)
            self.tracker.log_metrics(state.last_eval, 0)
        while state.step < cfg.max_steps and not state.early_stop.get("stopped"):
            metrics = self.train_step(state.step)
            self._stop_if_not_finite(metrics, state.step + 1)
            state.step += 1
            last = state.step == cfg.max_steps
            evaluating = cfg.eval_every and (state.step % cfg.eval_every == 0 or last)
            if evaluating and self.ctx.rank == 0:
                state.last_eval = self.evaluate(state.step)
                metrics.update(state.last_eval)
            if evaluating and cfg.early_stop_metric and not last and self._should_stop(metrics):
                last, state.early_stop["stopped"] = True, True
                metrics["early_stopped"] = 1.0
            metrics["step"] = state.step
            self.tracker.log_metrics(metrics, state.step)
            bar.set_description(f"alignprop reward={metrics['reward/total_mean']:.4f} k={metrics['k']:g}")
            bar.update(1)
            self._report({**state.last_eval, **metrics}, checkpoint=state.step % cfg.ckpt_every == 0 or last)
            if last:
                break
        bar.close()
        self._log_final_adapters()
        return metrics

    def _stop_if_not_finite(self, metrics: dict[str, float], step: int) -> None:
        """A NaN or infinite loss, gradient norm or LoRA weight ends the run (every rank sees the same
        gathered metrics and weights) before the step is logged or checkpointed: the checkpoints before it
        stay the last ones. fp16's dynamic loss scale skips overflowing steps itself: its grad norm may be inf."""
        fp16 = resolve_precision(self.cfg.deepspeed.precision, self.ctx.device) == "fp16"
        bad = [f"{key} {metrics[key]}" for key in ("loss", *(() if fp16 else ("grad_norm",)))
               if key in metrics and not math.isfinite(metrics[key])]
        bad += [f"LoRA weight {name}" for name, p in self.lora_parameters() if not torch.isfinite(p).all()][:1]
        if bad:
            raise NonFiniteError(f"step {step}: {', '.join(bad)} not finite; the run stops and its earlier checkpoints "
                                 "are kept; accepted: a lower optim.lr, optim.max_grad_norm > 0, or smaller reward "
                                 "weights")

    def _report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        """One report per step on every rank; with a checkpoint every `ckpt_every` steps and at the end."""
        if not checkpoint:
            self.ctx.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as directory:
            self.save_checkpoint(directory)
            self.ctx.report(metrics, directory)

    def _log_final_adapters(self) -> None:
        self.tracker.log_lora(lambda d: save_lora(self.denoiser, d), "lora/final")
        if self.ema is not None:
            with self.ema.swapped_in(self.lora_parameters()):
                self.tracker.log_lora(lambda d: save_lora(self.denoiser, d), "lora/final_ema")
