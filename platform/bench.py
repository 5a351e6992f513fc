"""`alignprop bench`: seconds per AlignProp step and peak memory for K ∈ {1, N/2, N}, with and
without per-step activation checkpointing — a sizing tool, not a test. Any model family:

    alignprop bench --config tiny-cpu --steps 3
    alignprop bench --config tiny-sdxl-cpu --steps 3
    alignprop bench --config tiny-sd3-cpu --steps 3
    alignprop bench --config sd15-aesthetic ray.use_gpu=true

Each cell runs in a fresh process (peak RSS on CPU is per process) or, on GPU, after resetting
CUDA's peak counter. The step is the recipe's core: sample → decode → reward → backward → AdamW.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from alignprop.platform.config import ConfigError, RunConfig, from_dict, to_dict


def _cell(config: dict, k: int, use_checkpoint: bool, steps: int) -> tuple[float, float]:
    from alignprop.platform.models import add_lora, load_pipeline
    from alignprop.rewards import build_rewards
    from alignprop.trainers.alignprop import peak_memory_mb
    from alignprop.trainers.families import denoiser
    from alignprop.trainers.sampling import encode_prompts, negative_prompt, sample

    torch.set_num_threads(1)
    cfg: RunConfig = from_dict(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(cfg.model).to(device)
    model = denoiser(pipe)
    params = add_lora(model, cfg.lora)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
    rewards = build_rewards(cfg.rewards).to(device)
    prompts = ["a photo of a cat"] * cfg.trainer.batch_size
    embeds, negative = encode_prompts(pipe, prompts, device), negative_prompt(pipe, len(prompts), device)
    s, times = cfg.sampling, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        out = sample(pipe, model, embeds, negative, s.num_steps, k, s.guidance_scale, s.eta,
                     s.resolution, torch.Generator().manual_seed(i), checkpoint_unet=use_checkpoint,
                     checkpoint_vae=s.checkpoint_vae)
        loss = -rewards(out.images, prompts)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps, peak_memory_mb(device)


def _run_cell(config: dict, k: int, use_checkpoint: bool, steps: int) -> tuple[float, float]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cell, (config, k, use_checkpoint, steps))


def run_bench(cfg: RunConfig, steps: int = 3) -> list[dict]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # before any process starts
        raise ConfigError(f"--steps: got {steps!r}; accepted: an integer >= 1")
    n = cfg.sampling.num_steps
    ks = sorted({1, max(1, n // 2), n})
    config, rows = to_dict(cfg), []
    memory = "peak CUDA MB" if torch.cuda.is_available() else "peak RSS MB"
    from alignprop.platform.models import resolve_family

    family = resolve_family(cfg.model, local_only=False)
    print(f"# {cfg.name} ({family}): N={n}, batch={cfg.trainer.batch_size}, resolution={cfg.sampling.resolution}, {steps} timed steps per cell")
    print(f"| K | checkpointing | s/step | {memory} | s/step vs K=1 ckpt |")
    print("|---|---|---|---|---|")
    for k in ks:
        for use_checkpoint in (True, False):
            seconds, peak = _run_cell(config, k, use_checkpoint, steps)
            rows.append({"k": k, "checkpoint": use_checkpoint, "s_per_step": seconds, "peak_mb": peak})
            base = rows[0]["s_per_step"]
            print(f"| {k} | {'per-step' if use_checkpoint else 'none'} | {seconds:.3f} | {peak:.0f} | {seconds / base:.2f}× |", flush=True)
    return rows
