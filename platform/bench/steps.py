"""`alignprop bench`: seconds per AlignProp step, per phase, with the denoiser's FLOPs, MFU (GPU) and
peak memory, for a grid of K × batch × checkpointing — a sizing tool, not a test. Any model family:

    alignprop bench --config tiny-cpu --steps 3                       # K ∈ {1, N/2, N} × all/none/auto
    alignprop bench --config tiny-sd3-cpu --steps 1 --json            # one JSON object per cell and line
    alignprop bench --config sd15-aesthetic model.pretrained=null model.arch=sd15 ray.use_gpu=true \
        rewards='[{name: brightness}]' --k 1,5,50 --batch 1,2,4 --checkpoint all,auto

A cell is one real recipe step (`AlignPropRecipe`: DeepSpeed engine, LoRA, the config's `perf:`
switches), timed by phase: `prefix` (text encoding + the no-grad steps), `window` (the steps that keep
a graph), `decode` (VAE), `reward`, `backward` (incl. checkpoint recomputation), `optimizer`. The
denoiser's FLOPs are counted once per batch size with `torch.utils.flop_counter` on a meta-device
copy (no compute); MFU = those FLOPs per second over the device's dense bf16 peak (CUDA only).
On CPU each cell runs in a fresh process (peak RSS is per process); on CUDA the cells share one
process and pipeline, with CUDA's peak counter reset per cell.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import sys
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ..config import CHECKPOINT_MODES, ConfigError, RunConfig, from_dict, to_dict
from ...trainers.alignprop import AlignPropRecipe, WorkerContext
from ...trainers.engine import peak_memory_mb, single_process_world
from ...trainers.families import Conditioning, family_of
from ...trainers.sampling import PhaseTimer, grad_window
from ..console import is_noise, quiet_known_noise
from ..models import add_lora, resolve_family

PHASES = ("prefix", "window", "decode", "reward", "backward", "optimizer")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s), matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}


def peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_recipe(cfg: RunConfig, device: torch.device):
    cfg = replace(cfg, trainer=replace(cfg.trainer, eval_every=0))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # DeepSpeed print()s "op built successfully" at every start
        single_process_world(device)
        recipe = AlignPropRecipe(cfg, WorkerContext(device=device, progress=False)).setup()
    for line in printed.getvalue().splitlines():
        if not is_noise(line):
            print(line)
    return recipe


def denoiser_flops(recipe, batch: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of one guided denoiser call at `batch` prompts, counted on a
    meta-device copy with LoRA (math attention, so every device counts the same matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg, pipe = recipe.cfg, recipe.pipe
    family, s = family_of(pipe), cfg.sampling
    with torch.device("meta"):
        model = type(recipe.denoiser).from_config(recipe.denoiser.config)
    add_lora(model, cfg.lora)
    calls = batch * (2 if s.guidance_scale > 1 else 1)
    meta = lambda x: None if x is None else torch.empty((calls, *x.shape[1:]), device="meta")  # noqa: E731
    text = Conditioning(meta(recipe.negative.embeds), meta(recipe.negative.pooled))
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (calls, model.config.in_channels, s.resolution // scale, s.resolution // scale)
    latents, t = torch.empty(shape, device="meta", requires_grad=True), torch.tensor(500.0, device="meta")
    with sdpa_kernel([SDPBackend.MATH]):
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            family.denoise(model, latents, t, text, s.resolution)
        with FlopCounterMode(display=False) as both:
            family.denoise(model, latents, t, text, s.resolution).sum().backward()
    return float(forward.get_total_flops()), float(both.get_total_flops() - forward.get_total_flops())


def time_step(recipe, k: int, batch: int, seed: int) -> tuple[dict[str, float], object]:
    """One instrumented AlignProp step (the recipe's, with K fixed): seconds per phase."""
    cfg, device = recipe.cfg, recipe.ctx.device
    prompts = [recipe.prompts[i % len(recipe.prompts)] for i in range(batch)]
    phases = PhaseTimer(device)
    recipe.engine.train()
    with recipe.autocast():
        out = recipe.sample(prompts, torch.Generator().manual_seed(seed), k=k,
                            grad_steps=list(grad_window(cfg.sampling.num_steps, k)), phases=phases)
        total, _ = recipe.rewards(out.images, prompts)
        phases.mark("reward")
    recipe.engine.backward(-total.mean())
    phases.mark("backward")
    recipe.engine.step()
    phases.mark("optimizer")
    return phases.seconds, out


def measure_cell(recipe, k: int, batch: int, mode: str, steps: int, flops: tuple[float, float]) -> dict:
    """Warm-up step, then `steps` timed steps of one cell; the row `--json` prints."""
    cfg, device = recipe.cfg, recipe.ctx.device
    cfg.sampling.checkpoint_unet = mode  # the plan is built per step from the (mutable) config
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    totals, out = {name: 0.0 for name in PHASES}, None
    for i in range(steps + 1):
        seconds, out = time_step(recipe, k, batch, seed=i)
        for name, value in seconds.items():
            totals[name] = totals.get(name, 0.0) + (value if i else 0.0)
    phases = {name: value / steps for name, value in totals.items()}
    s_per_step = sum(phases.values())
    fwd, bwd = flops
    unet_flops = (cfg.sampling.num_steps + out.recomputed) * fwd + k * bwd
    peak = peak_tflops(device)
    unet_s = phases["prefix"] + phases["window"] + phases["backward"]
    return {
        "config": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "k": k, "batch": batch, "checkpoint": mode, "kept": out.kept, "recomputed": out.recomputed,
        "kept_activation_mb": out.kept_bytes / 2**20 if mode == "auto" else None,
        "s_per_step": s_per_step, "peak_mb": peak_memory_mb(device), "phases": phases,
        "unet_tflop_per_step": unet_flops / 1e12, "unet_tflops_per_s": unet_flops / s_per_step / 1e12,
        "mfu": unet_flops / s_per_step / (peak * 1e12) if peak else None,
        "mfu_unet_phases": unet_flops / unet_s / (peak * 1e12) if peak else None,
    }


def run_cells(config: dict, cells: Sequence[tuple[int, int, str]], steps: int) -> list[dict]:
    """Cells (k, batch, mode) of one config in this process, sharing one recipe."""
    quiet_known_noise()
    torch.set_num_threads(int(os.environ.get("ALIGNPROP_BENCH_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe, flops, rows = build_recipe(from_dict(config), device), {}, []
    for k, batch, mode in cells:
        if batch not in flops:
            flops[batch] = denoiser_flops(recipe, batch)
        rows.append(cell_row(recipe, k, batch, mode, steps, flops[batch]))
    return rows


def cell_row(recipe, k: int, batch: int, mode: str, steps: int, flops: tuple[float, float]) -> dict:
    """`measure_cell`, or a row saying CUDA ran out of memory (e.g. checkpoint none at large K), so
    that a grid goes on."""
    try:
        return measure_cell(recipe, k, batch, mode, steps, flops)
    except torch.cuda.OutOfMemoryError:
        recipe.engine.zero_grad()
        torch.cuda.empty_cache()
        return {"config": recipe.cfg.name, "k": k, "batch": batch, "checkpoint": mode, "error": "CUDA out of memory"}


def _spawned(config: dict, cells, steps: int) -> list[dict]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_cells, (config, cells, steps))


def parse_list(text: Optional[str], cast, option: str, accepted: str) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option}: got {text!r}; accepted: {accepted}")
    return values


def run_bench(cfg: RunConfig, steps: int = 3, ks: Optional[Sequence[int]] = None,
              batches: Optional[Sequence[int]] = None,
              modes: Sequence[str] = CHECKPOINT_MODES, json_lines: bool = False) -> list[dict]:
    """The grid K × batch × checkpoint mode (defaults: K ∈ {1, N/2, N}, the config's batch, all
    three modes); prints a Markdown table, or one JSON object per cell with `json_lines`."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # before any process starts
        raise ConfigError(f"--steps: got {steps!r}; accepted: an integer >= 1")
    n = cfg.sampling.num_steps
    ks = sorted({1, max(1, n // 2), n}) if ks is None else list(ks)
    batches = [cfg.trainer.batch_size] if batches is None else list(batches)
    for k in ks:
        if not 1 <= k <= n:
            raise ConfigError(f"--k: got {k}; accepted: 1 <= K <= sampling.num_steps ({n})")
    for b in batches:
        if b < 1:
            raise ConfigError(f"--batch: got {b}; accepted: integers >= 1")
    for m in modes:
        if m not in CHECKPOINT_MODES:
            raise ConfigError(f"--checkpoint: got {m!r}; accepted: {', '.join(CHECKPOINT_MODES)}")
    cells = [(k, b, m) for b in batches for k in ks for m in modes]
    config, cuda = to_dict(cfg), torch.cuda.is_available()
    if not json_lines:
        family = resolve_family(cfg.model, local_only=False)
        print(f"# {cfg.name} ({family}): N={n}, resolution={cfg.sampling.resolution}, {steps} timed steps per cell, "
              f"{'CUDA' if cuda else 'CPU'}; phases in s/step")
        print(table_header())
    rows = []
    for group in ([cells] if cuda else [[c] for c in cells]):
        for row in (run_cells(config, group, steps) if cuda else _spawned(config, group, steps)):
            rows.append(row)
            print(json.dumps(row) if json_lines else table_row(row, rows), flush=True)
    return rows


def table_header() -> str:
    names = " | ".join(PHASES)
    return (f"| K | batch | checkpoint | kept/recomputed | s/step | vs first | peak MB | {names} | UNet TFLOP/step | "
            "MFU |\n"
            f"|{'---|' * (9 + len(PHASES))}")


def table_row(row: dict, rows: Sequence[dict]) -> str:
    if "error" in row:
        return f"| {row['k']} | {row['batch']} | {row['checkpoint']} | | {row['error']} |"
    base = next(r for r in rows if r["batch"] == row["batch"] and "error" not in r)["s_per_step"]
    phases = " | ".join(f"{row['phases'].get(p, 0.0):.3f}" for p in PHASES)
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "–"
    return (f"| {row['k']} | {row['batch']} | {row['checkpoint']} | {row['kept']}/{row['recomputed']} | "
            f"{row['s_per_step']:.3f} | "
            f"{row['s_per_step'] / base:.2f}× | {row['peak_mb']:.0f} | {phases} | {row['unet_tflop_per_step']:.3f} "
            f"| {mfu} |")


if __name__ == "__main__":  # pragma: no cover - `alignprop bench` is the entry point
    sys.exit("use: alignprop bench --config <preset>")
