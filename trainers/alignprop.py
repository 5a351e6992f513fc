"""The AlignProp recipe, one worker's view: setup → train step → evaluate → save/load checkpoint.
`trainer.algorithm` picks the train step: alignprop (below), refl and draft_lv (a few lines each in
`_train_images`), ddpo (trainers/ddpo.py); the rest of the lifecycle is shared.

Run through Ray Train (one copy per worker) by `alignprop train --config tiny-cpu`; the recipe itself
knows nothing of Ray: it gets a `WorkerContext` (rank, device, report(), the checkpoint to resume).

Per micro-batch of an optimizer step: draw K from (seed, step, micro-batch) → sample N DDIM steps
with CFG, the last K with a graph and checkpointed UNet calls (or, `truncation.strategy=per_step`,
the official code's scattered steps) → decode → weighted rewards → loss = −mean(reward) →
DeepSpeed backward of loss × `optim.loss_scale`/step (gradient clipping, accumulation, ZeRO 0–2).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from alignprop.platform.config import RunConfig, read_prompt_file, refl_bounds
from alignprop.platform.models import add_lora, load_pipeline, save_lora
from alignprop.platform.tracking import Tracker
from alignprop.rewards import build_rewards
from alignprop.trainers.checkpoint import UnsafeCheckpointError, check_checkpoint_files  # noqa: F401 (re-export)
from alignprop.trainers.checkpoint import load_engine_state, save_engine_state
from alignprop.trainers.families import denoiser
from alignprop.trainers.perf import apply_perf, autocast, compiled_prefix, compute_dtype
from alignprop.trainers.sampling import CheckpointPlan, draft_lv_images, draw_grad_steps, encode_prompts, negative_prompt, sample

STATE_FILE = "trainer_state.json"
EMA_FILE = "lora_ema.safetensors"


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


def single_process_world(device: torch.device) -> None:
    """A one-rank torch.distributed world, as a launcher would set it up, for DeepSpeed outside Ray
    (bench, gpu-check, tests): NCCL on CUDA, gloo on CPU; nothing if a world exists already."""
    import socket

    import deepspeed

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def deepspeed_config(cfg: RunConfig, device: torch.device) -> dict:
    # perf.autocast keeps the LoRA weights and their optimizer fp32: DeepSpeed's own precision stays off
    precision = "fp32" if cfg.perf.autocast != "none" else resolve_precision(cfg.deepspeed.precision, device)
    return {
        "train_micro_batch_size_per_gpu": cfg.trainer.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum * backward_calls_per_micro_batch(cfg),
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "auto_cast": False},
        "zero_allow_untested_optimizer": True,  # our client torch AdamW: no fused_adam JIT build
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def backward_calls_per_micro_batch(cfg: RunConfig) -> int:
    """DDPO calls backward once per trained timestep (ddpo-pytorch: accumulation × num_train_timesteps)."""
    if cfg.trainer.algorithm != "ddpo":
        return 1
    return max(1, int(cfg.sampling.num_steps * cfg.ddpo.timestep_fraction))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_prompts(cfg: RunConfig) -> list[str]:
    """Training prompts: the list, or the prompt file (the launcher reads it on the driver)."""
    return list(cfg.trainer.prompts) if cfg.trainer.prompts else read_prompt_file(cfg.trainer.prompt_file)


def load_eval_prompts(cfg: RunConfig) -> list[str]:
    if cfg.trainer.eval_prompts or not cfg.trainer.eval_prompt_file:
        return list(cfg.trainer.eval_prompts)
    return read_prompt_file(cfg.trainer.eval_prompt_file, "trainer.eval_prompt_file")


class AlignPropRecipe:
    def __init__(self, cfg: RunConfig, ctx: WorkerContext):
        self.cfg, self.ctx = cfg, ctx
        self.step = 0  # optimizer steps completed
        self.best_eval = -math.inf
        self.early_stop = {"best": -math.inf, "evals_without_best": 0}
        self.ema: dict[str, torch.Tensor] = {}
        self.last_eval: dict[str, float] = {}  # carried in every report: schedulers compare it each step
        self.tracker = Tracker(ctx.tracking_uri, ctx.run_id, enabled=ctx.rank == 0)
        self.images_seen, self.unet_evals, self.wall_s = 0, 0, 0.0  # the common x-axis of every algorithm
        self.ddpo_stats = None  # DDPO's per-prompt reward statistics (trainers/ddpo.py)

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> "AlignPropRecipe":
        import deepspeed

        cfg, device = self.cfg, self.ctx.device
        torch.manual_seed(cfg.trainer.seed + self.ctx.rank)
        self.pipe = load_pipeline(cfg.model, device).to(device)
        self.denoiser = denoiser(self.pipe)  # the UNet (sd, sdxl) or the transformer (sd3)
        lora_params = add_lora(self.denoiser, cfg.lora)
        optimizer = torch.optim.AdamW(
            lora_params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.denoiser, optimizer=optimizer, config=deepspeed_config(cfg, device),
        )
        apply_perf(self.pipe, self.denoiser, cfg.perf, device)  # after DeepSpeed's broadcast, which needs contiguous weights
        self.prefix_unet = compiled_prefix(self.denoiser, cfg.perf)
        dtype = compute_dtype(cfg.perf, resolve_precision(cfg.deepspeed.precision, device))
        self.rewards = build_rewards(cfg.rewards, dtype=dtype).to(device)
        self.eval_rewards = build_rewards(cfg.eval_rewards, dtype=dtype).to(device) if cfg.eval_rewards else None
        self.prompts, self.eval_prompts = load_prompts(cfg), load_eval_prompts(cfg)
        self.negative = negative_prompt(self.pipe, 1, device)  # CFG's unconditional input, encoded once
        if cfg.trainer.ema_decay > 0:
            self.ema = {n: p.detach().clone().float() for n, p in self._lora_parameters()}
        if self.ctx.resume_dir:
            self.load_checkpoint(self.ctx.resume_dir)
        return self

    # ------------------------------------------------------------------------ train step
    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        return _gather_rows(rows, self.ctx.world_size, self.ctx.device)

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.trainer.seed, *parts)) % 2**63)

    def _sample(self, prompts: list[str], k: int, generator: torch.Generator, embeds=None, **options):
        """`sample` with the run's sampling settings (options: grad_steps, stop_at, trajectory);
        `embeds`: the prompts' conditioning when the caller has it already."""
        s = self.cfg.sampling
        embeds = encode_prompts(self.pipe, prompts, self.ctx.device) if embeds is None else embeds
        return sample(
            self.pipe, self.engine, embeds, self.negative.expand(len(prompts)), s.num_steps, k, s.guidance_scale,
            s.eta, s.resolution, generator, checkpoint_unet=self._checkpoint_plan(), checkpoint_vae=s.checkpoint_vae,
            prefix_unet=self.prefix_unet, **options,
        )

    def _checkpoint_plan(self) -> CheckpointPlan:
        return CheckpointPlan(self.cfg.sampling.checkpoint_unet, self.cfg.sampling.activation_budget_mb)

    def autocast(self):
        return autocast(self.cfg.perf, self.ctx.device)

    def _pick_prompts(self, step: int, micro: int) -> list[str]:
        pick = random.Random(hash((self.cfg.trainer.seed, step, micro, self.ctx.rank)))
        return [pick.choice(self.prompts) for _ in range(self.cfg.trainer.batch_size)]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of `trainer.algorithm`; returns metrics averaged over ranks."""
        if self.cfg.trainer.fail_at_step == step + 1 and not self.ctx.resume_dir:
            raise RuntimeError(f"injected failure at step {step + 1} (trainer.fail_at_step)")
        if self.cfg.trainer.algorithm == "ddpo":
            from alignprop.trainers import ddpo

            return ddpo.train_step(self, step)
        return self._reward_gradient_step(step)

    def _reward_gradient_step(self, step: int) -> dict[str, float]:
        """AlignProp, ReFL or DRaFT-LV: grad_accum micro-batches, loss = −mean reward, backward."""
        cfg, start = self.cfg, time.perf_counter()
        self.engine.train()
        rows, ks, evals = [], [], []
        for micro in range(cfg.optim.grad_accum):
            prompts = self._pick_prompts(step, micro)
            with self.autocast():
                images, scored_prompts, k, per_image = self._train_images(prompts, step, micro)
                # before any running statistics exist, normalised rewards use statistics of all ranks
                total, parts = self.rewards(images, scored_prompts, gather=self._gather)
            ks.append(k)
            evals.append(per_image)
            loss = -total.mean()
            if not loss.requires_grad:  # per_step may keep no step at all: a zero gradient, as DeepSpeed needs one
                loss = loss + sum(p.sum() for _, p in self._lora_parameters()) * 0.0
            self.engine.backward(loss * cfg.optim.loss_scale)  # metrics report the unscaled loss
            self.engine.step()
            rows.append(torch.stack([total, *parts.values()], dim=1).detach().float().cpu())
        values = _gather_rows(torch.cat(rows), self.ctx.world_size, self.ctx.device)
        sampled = cfg.trainer.batch_size * cfg.optim.grad_accum * self.ctx.world_size
        metrics = self.finish_step(values, time.perf_counter() - start, sampled, sum(evals) / len(evals))
        metrics["k"] = sum(ks) / len(ks)  # mean number of steps that kept a gradient
        if min(ks) != max(ks):
            metrics["k_min"], metrics["k_max"] = float(min(ks)), float(max(ks))
        return metrics

    def _train_images(self, prompts: list[str], step: int, micro: int):
        """(differentiable images, their prompts, steps with a graph, denoiser evaluations per sampled
        image incl. checkpoint recomputation) for the reward-gradient algorithms."""
        cfg, s = self.cfg, self.cfg.sampling
        generator, per_call = self._generator(step, micro, self.ctx.rank), 2 if s.guidance_scale > 1 else 1
        algorithm = cfg.trainer.algorithm
        if algorithm == "refl":  # the stop step per (step, micro-batch), the same on every rank
            stop = random.Random(f"alignprop-refl/{cfg.trainer.seed}/{step}/{micro}").randint(*refl_bounds(cfg))
            out = self._sample(prompts, 1, generator, grad_steps=[stop], stop_at=stop)
            return out.images, prompts, 1, (stop + 1 + out.recomputed) * per_call
        if algorithm == "draft_lv":
            copies, embeds = cfg.draft_lv.copies, encode_prompts(self.pipe, prompts, self.ctx.device)
            with torch.no_grad():
                x0 = self._sample(prompts, 1, generator, embeds=embeds).latents
            plan = self._checkpoint_plan()
            images = draft_lv_images(self.pipe, self.engine, embeds, self.negative.expand(len(prompts)), x0, copies,
                                     s.guidance_scale, s.eta, s.resolution, generator, plan, s.checkpoint_vae)
            return images, prompts * copies, 1, (s.num_steps + copies + plan.recomputed) * per_call
        # K (or per_step's cuts) per (step, micro-batch), not per rank: every rank runs the same
        # number of gradient steps, and a resumed run replays the same draws
        grad_steps = draw_grad_steps(cfg.truncation, s.num_steps, cfg.trainer.seed, step, micro)
        out = self._sample(prompts, len(grad_steps), generator, grad_steps=grad_steps)
        return out.images, prompts, len(grad_steps), (s.num_steps + out.recomputed) * per_call

    def finish_step(self, values: torch.Tensor, seconds: float, sampled: int, evals_per_image: float) -> dict[str, float]:
        """After an update, on every rank: reward statistics, EMA, the common x-axis counters
        (`images_seen`, `unet_evals`, `wall_s`, all ranks) and the metrics of the gathered reward rows."""
        self.rewards.update_stats(values[:, 1:])  # same numbers on every rank → same normalisation
        self._update_ema()
        self.images_seen += sampled
        self.unet_evals += int(round(sampled * evals_per_image))
        self.wall_s += seconds
        metrics = {
            "loss": float(-values[:, 0].mean()),
            "reward/total_mean": float(values[:, 0].mean()),
            "reward/total_std": float(values[:, 0].std()) if len(values) > 1 else 0.0,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "step_time_s": seconds,
            "images_per_s": sampled / seconds,
            "peak_memory_mb": peak_memory_mb(self.ctx.device),
            "images_seen": float(self.images_seen),
            "unet_evals": float(self.unet_evals),
            "wall_s": self.wall_s,
        }
        for i, label in enumerate(self.rewards.labels, start=1):
            metrics[f"reward/{label}_mean"] = float(values[:, i].mean())
            metrics[f"reward/{label}_std"] = float(values[:, i].std()) if len(values) > 1 else 0.0
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    # -------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Rank 0: fixed-seed samples of the held-out prompts, scored by train and eval rewards;
        logs the image grid and the best adapter. With EMA, the EMA weights are scored too."""
        metrics = self._evaluate_weights(step, "eval")
        if metrics["eval/reward_total"] > self.best_eval:
            self.best_eval = metrics["eval/reward_total"]
            self.tracker.log_lora(lambda d: save_lora(self.denoiser, d), "lora/best")
        if self.ema:
            with self._ema_weights():
                metrics.update(self._evaluate_weights(step, "eval_ema"))
        return metrics

    def _evaluate_weights(self, step: int, prefix: str) -> dict[str, float]:
        cfg = self.cfg
        self.engine.eval()
        prompts = list(self.eval_prompts)
        with self.autocast():
            out = self._sample(prompts, 1, torch.Generator().manual_seed(cfg.trainer.eval_seed))
            total, parts = self.rewards(out.images, prompts)
        metrics = {f"{prefix}/reward_total": float(total.mean())}
        metrics.update({f"{prefix}/{label}": float(v.mean()) for label, v in parts.items()})
        if self.eval_rewards is not None:
            with self.autocast():
                _, held_out = self.eval_rewards(out.images, prompts)
            metrics.update({f"{prefix}/{label}": float(v.mean()) for label, v in held_out.items()})
        self.tracker.log_image(out.images, f"{prefix}/samples", step, captions=prompts)
        return metrics

    def _should_stop(self, metrics: dict[str, float]) -> bool:
        """Early stopping on a held-out metric; rank 0 decides, every rank learns the verdict."""
        name, stop = self.cfg.trainer.early_stop_metric, 0
        if self.ctx.rank == 0:
            value, state = metrics[name], self.early_stop
            if value > state["best"]:
                state["best"], state["evals_without_best"] = value, 0
            else:
                state["evals_without_best"] += 1
            stop = int(state["evals_without_best"] >= self.cfg.trainer.early_stop_patience)
        if self.ctx.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([stop], device=self.ctx.device)
            dist.broadcast(flag, src=0)
            stop = int(flag.item())
        return bool(stop)

    # ------------------------------------------------------------------------------ EMA
    def _lora_parameters(self):
        return [(n, p) for n, p in self.denoiser.named_parameters() if "lora_" in n]

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.trainer.ema_decay
        for name, p in self._lora_parameters() if self.ema else ():
            self.ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @contextmanager
    def _ema_weights(self):
        """Temporarily swap the EMA weights into the denoiser's LoRA layers."""
        params = dict(self._lora_parameters())
        raw = {n: p.detach().clone() for n, p in params.items()}
        for name, p in params.items():
            p.data.copy_(self.ema[name])
        try:
            yield
        finally:
            for name, p in params.items():
                p.data.copy_(raw[name])

    # ------------------------------------------------------------------ save/load checkpoint
    # safetensors + JSON only, loadable at any world size and ZeRO stage: the engine's part
    # (master weights, AdamW state, counters, RNG) is trainers/checkpoint.py, the rest is here.
    def save_checkpoint(self, directory: str) -> None:
        """Every rank, at the same step (the ZeRO gathers are collective); rank 0 writes the shared
        files, every rank its own RNG state."""
        path, ctx = Path(directory), self.ctx
        path.mkdir(parents=True, exist_ok=True)
        save_engine_state(self.engine, self._lora_parameters(), path, ctx.rank, ctx.world_size, ctx.device)
        if ctx.rank != 0:
            return
        save_lora(self.denoiser, directory)
        state = {"step": self.step, "best_eval": self.best_eval, "config_name": self.cfg.name,
                 "early_stop": self.early_stop, "reward_stats": self.rewards.stats, "last_eval": self.last_eval,
                 "images_seen": self.images_seen, "unet_evals": self.unet_evals, "wall_s": self.wall_s,
                 "ddpo_stats": self.ddpo_stats.state() if self.ddpo_stats else None}
        (path / STATE_FILE).write_text(json.dumps(state))
        if self.ema:
            save_file({n: t.cpu().contiguous() for n, t in self.ema.items()}, str(path / EMA_FILE))

    def load_checkpoint(self, directory: str) -> None:
        """Every rank: refuse anything but .safetensors/.json, then restore this rank's share of the
        engine state (`load_engine_state`), the trainer state and the EMA weights."""
        path = Path(directory)
        load_engine_state(self.engine, self._lora_parameters(), path, self.ctx.rank, self.ctx.device)
        state = json.loads((path / STATE_FILE).read_text())
        self.step, self.best_eval = int(state["step"]), float(state["best_eval"])
        self.early_stop = state.get("early_stop", self.early_stop)
        self.last_eval = state.get("last_eval", {}) if self.ctx.rank == 0 else {}
        self.rewards.stats.update(state.get("reward_stats", {}))
        self.images_seen, self.unet_evals = int(state.get("images_seen", 0)), int(state.get("unet_evals", 0))
        self.wall_s = float(state.get("wall_s", 0.0))
        if state.get("ddpo_stats") is not None:
            from alignprop.trainers.ddpo import PerPromptStatTracker

            d = self.cfg.ddpo
            self.ddpo_stats = PerPromptStatTracker(d.stats_buffer, d.stats_min_count, state["ddpo_stats"])
        if self.ema and (path / EMA_FILE).exists():
            self.ema = {n: t.to(self.ctx.device) for n, t in load_file(str(path / EMA_FILE)).items()}

    # ----------------------------------------------------------------------------- train
    def train(self) -> dict[str, float]:
        """Steps from the resumed step to max_steps; every rank reports once per step."""
        cfg, metrics = self.cfg.trainer, {}
        if self.ctx.rank == 0 and self.ctx.resume_dir:
            done = self.step >= cfg.max_steps or self.early_stop.get("stopped")
            print(f"[alignprop] resumed at step {self.step} of {cfg.max_steps} from {self.ctx.resume_dir}"
                  + ("; nothing left to train (raise trainer.max_steps, or set tracking.run_name for a new run)" if done else ""),
                  file=sys.__stdout__, flush=True)
        bar = progress_bar(cfg.max_steps, self.step, enabled=self.ctx.rank == 0 and self.ctx.progress,
                           lines=self.ctx.progress_lines)
        if self.step == 0 and cfg.eval_every and self.ctx.rank == 0:  # the base model's baseline
            self.last_eval = self.evaluate(0)
            self.tracker.log_metrics(self.last_eval, 0)
        while self.step < cfg.max_steps and not self.early_stop.get("stopped"):
            metrics = self.train_step(self.step)
            self.step += 1
            last = self.step == cfg.max_steps
            evaluating = cfg.eval_every and (self.step % cfg.eval_every == 0 or last)
            if evaluating and self.ctx.rank == 0:
                self.last_eval = self.evaluate(self.step)
                metrics.update(self.last_eval)
            if evaluating and cfg.early_stop_metric and not last and self._should_stop(metrics):
                last, self.early_stop["stopped"] = True, True
                metrics["early_stopped"] = 1.0
            metrics["step"] = self.step
            self.tracker.log_metrics(metrics, self.step)
            bar.set_description(f"alignprop reward={metrics['reward/total_mean']:.4f} k={metrics['k']:g}")
            bar.update(1)
            if self.step % cfg.ckpt_every == 0 or last:
                with tempfile.TemporaryDirectory() as directory:
                    self.save_checkpoint(directory)
                    self.ctx.report({**self.last_eval, **metrics}, directory)
            else:
                self.ctx.report({**self.last_eval, **metrics}, None)
            if last:
                break
        bar.close()
        self.tracker.log_lora(lambda d: save_lora(self.denoiser, d), "lora/final")
        if self.ema:
            with self._ema_weights():
                self.tracker.log_lora(lambda d: save_lora(self.denoiser, d), "lora/final_ema")
        return metrics


class ProgressLines:
    """A bar for consoles that are no terminal: one line every tenth of the run and at the end."""

    def __init__(self, total: int, initial: int):
        self.total, self.n, self.desc, self.start, self.first = total, initial, "alignprop", time.monotonic(), initial
        self.every = max(1, total // 10)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n >= self.total:
            per_step = (time.monotonic() - self.start) / max(1, self.n - self.first)
            # sys.__stdout__: Ray Train's print patch tees a print to a wrapped sys.stdout and logs it
            # to the console as well (every line twice on the driver); this file it prints once.
            print(f"[{self.desc}] step {self.n}/{self.total} ({per_step:.2f} s/step)", file=sys.__stdout__, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, lines: bool = False):
    """Rank 0's bar. In a Ray worker, Ray's tqdm: the driver draws it as one bar (plain tqdm's
    carriage-return updates arrive there as a new line each); `lines` where no terminal shows it."""
    from tqdm.auto import tqdm

    ray = sys.modules.get("ray")  # imported by Ray's workers; never imported here (GPU checks run without Ray)
    if not enabled:
        return tqdm(total=total, disable=True)
    if lines:
        return ProgressLines(total, initial)
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        class Bar(ray_tqdm):
            def close(self):  # once: a second close (from __del__) would draw a new bar on the driver
                if not self._closed:
                    super().close()

        bar = Bar(total=total, desc="alignprop")
        bar.update(initial)
        return bar
    return tqdm(total=total, initial=initial, desc="alignprop")


def _gather_rows(rows: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's per-image reward rows (same shape on every rank)."""
    if world_size == 1 or not dist.is_initialized():
        return rows
    rows = rows.to(device)  # NCCL gathers device tensors only
    gathered = [torch.empty_like(rows) for _ in range(world_size)]
    dist.all_gather(gathered, rows)
    return torch.cat(gathered).cpu()

