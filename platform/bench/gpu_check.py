"""`make gpu-check`: the GPU tests and the SD1.5-size bench in one go, ≤ 8 minutes on one H100, written
as one Markdown table (plus the raw rows as JSON lines) for NOTES.md:

    make gpu-check                                  # = python -m alignprop.platform.bench.gpu_check --out gpu-check
    python -m alignprop.platform.bench.gpu_check --out DIR [--budget-s 420] [--skip-tests]

1. `pytest -m gpu tests/test_gpu.py`: NCCL, DeepSpeed bf16 and fp16, autocast, resume, checkpoint
   policy, the memory bound of K = 1 at 512 px batch 4 (SD1.5 size).
2. The bench grid with the SD1.5 architecture (`model.arch=sd15`, random weights), 512 px, N = 50,
   bf16: K ∈ {1, 5, 50} × batch {1, 2, 4} × checkpoint {all, auto}.
3. The fast paths at K = 1, batch 4, one switch at a time against that baseline: the LoRA wrapped
   (not folded) in the prefix, eager attention, channels-last, bf16 autocast with fp32 LoRA, TF32 off,
   `torch.compile` of the prefix.
4. The UNet alone, forward + backward at 512 px (batch 4 with CFG), bf16: MFU against the card's peak.
Each section runs while the time budget lasts; a failing section is a row saying so, not a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .steps import PHASES, build_recipe, cell_row, denoiser_flops, measure_cell, peak_tflops
from ..config import load_config
from ...trainers.families import family_of
from ...trainers.sampling import guidance_text, guided_prediction
from ..console import quiet_known_noise
from ..models import load_pipeline

REPO = Path(__file__).resolve().parents[2]
SD15 = ["model.pretrained=null", "model.tiny=false", "model.arch=sd15", "model.dtype=bfloat16",
        "deepspeed.precision=bf16", "ray.use_gpu=true", "sampling.resolution=512", "sampling.num_steps=50",
        "rewards=[{name: brightness, weight: 1.0}]", "truncation.k=1"]
FAST_PATHS = {  # label → overrides against the SD1.5 bf16 baseline
    "baseline (DeepSpeed bf16, SDPA, TF32, LoRA folded in the prefix)": [],
    "LoRA wrapped in the prefix (peft's layers)": ["perf.lora_prefix=wrapped"],
    "attention eager": ["perf.attention=eager"],
    "channels-last": ["perf.channels_last=true"],
    "autocast bf16, fp32 LoRA": ["deepspeed.precision=fp32", "perf.autocast=bf16"],
    "TF32 off": ["perf.tf32=false"],
    "compile prefix, CUDA graphs": ["perf.compile_prefix=true", "perf.compile_mode=reduce-overhead"],
    "compile prefix": ["perf.compile_prefix=true"],
}
FAST_PATH_STEPS = ["sampling.num_steps=20"]  # N = 20 for the switch comparison: the same calls, less time


TINY = ["sampling.num_steps=4", "truncation.k=1"]  # --dry-run: the code path on CPU


class Check:
    def __init__(self, out: Path, budget_s: float, dry_run: bool = False):
        self.out, self.budget_s, self.start = out, budget_s, time.monotonic()
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
        self.base = TINY if dry_run else SD15  # dry run: the tiny pipeline, a smaller grid
        self.ks = (1, 4) if dry_run else (1, 5, 50)
        self.batches = (1, 2) if dry_run else (1, 2, 4)
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (out / "gpu-check.jsonl").open("w")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def add(self, row: dict) -> None:
        row["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        print(json.dumps(row), flush=True)


def run_tests(check: Check, timeout: float) -> None:
    start = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    proc = subprocess.run(command,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    (check.out / "pytest-gpu.log").write_text(proc.stdout + proc.stderr)
    closing = [line for line in reversed(proc.stdout.splitlines())
               if " in " in line and any(word in line for word in ("passed", "failed", "error"))]
    summary = closing[0] if closing else "no summary"
    check.add({"section": "tests", "label": "pytest -m gpu tests/test_gpu.py", "result": summary.strip("= "),
               "rc": proc.returncode, "seconds": time.monotonic() - start})


def run_grid(check: Check, modes=("all", "auto"), steps=1) -> None:
    recipe = build_recipe(load_config("tiny-cpu", check.base), check.device)
    for batch in check.batches:
        flops = denoiser_flops(recipe, batch)
        for k in check.ks:
            for mode in modes:
                if check.left() < 60:
                    check.add({"section": "grid", "label": f"K={k} batch={batch} {mode}",
                               "result": "skipped: time budget"})
                    continue
                row = cell_row(recipe, k, batch, mode, steps, flops)
                check.add({"section": "grid", "label": f"K={k} batch={batch} {mode}", "result": row.get("error", "ok"),
                           **row})
    del recipe
    free_memory()


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_perf_switches(check: Check, steps=2) -> None:
    for label, overrides in FAST_PATHS.items():
        if "compile" in label and check.device.type != "cuda":
            continue  # inductor on CPU builds C++ for minutes: not part of the dry run
        if check.left() < (100 if "compile" in label else 30):
            check.add({"section": "fast path", "label": label, "result": "skipped: time budget"})
            continue
        start = time.monotonic()
        try:
            recipe = build_recipe(load_config("tiny-cpu", check.base + FAST_PATH_STEPS + overrides), check.device)
            row = measure_cell(recipe, 1, 4, "all", steps, denoiser_flops(recipe, 4))
            check.add({"section": "fast path", "label": label, "setup_and_warmup_s": time.monotonic() - start, **row})
        except Exception as err:  # one switch failing must not hide the others
            check.add({"section": "fast path", "label": label, "result": f"{type(err).__name__}: {str(err)[:160]}"})
        finally:
            recipe = None
            free_memory()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def run_unet_mfu(check: Check, batch=4, iters=10) -> None:
    """The UNet alone (bf16 weights, bf16 LoRA as DeepSpeed's bf16 engine holds it), one guided
    forward + backward at 512 px, as the engine runs it and in channels-last."""
    for overrides in ([], ["perf.channels_last=true"]):
        if check.left() > 30:
            _unet_mfu(check, batch, iters, overrides)
    if check.left() > 30:
        _forward_rows(check)


def seconds_per_call(call, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Mean wall time of `call()` after `warmup` calls, CUDA synchronised at both ends (the peak
    memory counter restarts after the warm-up)."""
    for _ in range(warmup):
        call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def _forward_rows(check: Check, iters=20) -> None:
    """No-grad forward calls (the prefix's work) of the bare UNet and of the LoRA'd one, batch 1 and 4
    (×2 for CFG): where the prefix's time goes (kernel launches vs arithmetic)."""
    recipe = build_recipe(load_config("tiny-cpu", check.base), check.device)
    bare = load_pipeline(recipe.cfg.model, check.device).to(check.device).unet
    peak = peak_tflops(check.device)
    for batch in (1, 4):
        fwd, _ = denoiser_flops(recipe, batch)
        res = recipe.cfg.sampling.resolution // 8
        x = torch.randn(2 * batch, 4, res, res, device=check.device, dtype=bare.dtype)
        text = recipe.negative.embeds.expand(2 * batch, -1, -1).to(bare.dtype)
        t = torch.tensor(500, device=check.device)
        for label, model in (("bare UNet", bare), ("UNet + LoRA (DeepSpeed engine)", recipe.engine)):
            with torch.no_grad():
                seconds = seconds_per_call(lambda: model(x, t, encoder_hidden_states=text, return_dict=False),
                                           check.device, iters)
            check.add({"section": "forward", "label": f"{label}, no grad, batch {batch} (CFG: {2 * batch})",
                       "s_per_step": seconds,
                       "unet_tflop_per_step": fwd / 1e12, "unet_tflops_per_s": fwd / seconds / 1e12,
                       "mfu": fwd / seconds / (peak * 1e12) if peak else None})


def _unet_mfu(check: Check, batch: int, iters: int, overrides: list[str]) -> None:
    device = check.device
    recipe = build_recipe(load_config("tiny-cpu", check.base + overrides), device)
    fwd, bwd = denoiser_flops(recipe, batch)
    pipe, unet, resolution = recipe.pipe, recipe.denoiser, recipe.cfg.sampling.resolution
    family_of(pipe).set_timesteps(pipe, 50, device, None)
    embeds = recipe.negative.expand(batch)
    text = guidance_text(unet, embeds, embeds, 7.5)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn(batch, 4, resolution // scale, resolution // scale, device=device, requires_grad=True)
    t = pipe.scheduler.timesteps[-1]

    def step():
        pred = guided_prediction(pipe, unet, latents, t, text, 7.5, resolution, None)
        pred.float().square().mean().backward()

    seconds = seconds_per_call(step, device, iters)
    peak = peak_tflops(device)
    label = f"UNet fwd+bwd, batch {batch} (CFG: {2 * batch}), {resolution} px, {recipe.cfg.model.dtype}"
    label += ", channels-last" if overrides else ""
    check.add({"section": "unet", "label": label,
               "s_per_step": seconds, "unet_tflop_per_step": (fwd + bwd) / 1e12,
               "unet_tflops_per_s": (fwd + bwd) / seconds / 1e12,
               "mfu": (fwd + bwd) / seconds / (peak * 1e12) if peak else None,
               "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None})


def write_table(check: Check) -> Path:
    device = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "CPU (dry run: tiny pipeline)"
    lines = [f"# gpu-check on {device}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"bf16 peak {peak_tflops(check.device)} TFLOP/s; SD1.5 architecture (random weights), 512 px, N = 50",
             "", f"| section | cell | s/step | peak MB | kept/recomputed | {' | '.join(PHASES)} | UNet TFLOP/step | "
                 "TFLOP/s | MFU | result |",
             f"|{'---|' * (9 + len(PHASES))}"]
    for r in check.rows:
        phases = " | ".join(f"{r['phases'][p]:.3f}" if "phases" in r else "" for p in PHASES)
        num = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else ""  # noqa: E731
        kept = f"{r['kept']}/{r['recomputed']}" if "kept" in r else ""
        lines.append(f"| {r['section']} | {r['label']} | {num('s_per_step', '.3f')} | {num('peak_mb', '.0f')} | "
                     f"{kept} | {phases} | "
                     f"{num('unet_tflop_per_step', '.2f')} | {num('unet_tflops_per_s', '.0f')} | "
                     f"{num('mfu', '.1%')} | {r.get('result', 'ok')} |")
    path = check.out / "gpu-check.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignprop.platform.bench.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check",
                        help="directory for gpu-check.md, gpu-check.jsonl, pytest-gpu.log")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cells after this many seconds")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--sections", default="tests,grid,fast,unet", help="comma-separated: tests, grid, fast, unet")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on CPU with the tiny pipeline (no tests section)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.skip_tests = True
    elif not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine (the script is ready)", file=sys.stderr)
        return 2
    if not args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    quiet_known_noise()
    check = Check(Path(args.out), args.budget_s, args.dry_run)
    owns_world = not torch.distributed.is_initialized()  # a caller's world (tests) stays up
    sections = set(args.sections.split(",")) - ({"tests"} if args.skip_tests else set())
    steps = [("tests", lambda: run_tests(check, timeout=max(60.0, min(240.0, check.left() - 200)))),
             ("grid", lambda: run_grid(check)), ("unet", lambda: run_unet_mfu(check)),
             ("fast", lambda: run_perf_switches(check))]
    for name, run in steps:
        if name not in sections:
            continue
        try:
            run()
        except Exception as err:  # noqa: BLE001 - a section's failure is a row of the table
            check.add({"section": name, "label": "section", "result": f"{type(err).__name__}: {str(err)[:200]}"})
            torch.cuda.empty_cache()
    path = write_table(check)
    if owns_world and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else NCCL warns at exit that the group leaks
    print(f"gpu-check: {len(check.rows)} rows in {time.monotonic() - check.start:.0f} s → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
