"""The memory a reward-gradient step keeps for backward, against the number of sampling steps N: a table,
not a test. Per algorithm and N, one real recipe step's images are built (the run's config, every denoiser
call with a graph keeping its activations: `sampling.checkpoint_unet=none`) and the bytes autograd saves
are counted (parameters excluded; `sampling.saved_bytes`), so the numbers are the same on every device.

    python -m alignprop.platform.bench.graph_memory --config toy-count --steps 10,20,40

AlignProp with K = N (full backprop) grows with N; AlignProp's last K, ReFL, DRaFT-LV, DRTune (K calls,
inputs detached: only the sampler's linear updates chain the steps) and Direct-Align (one call) should not.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from ..config import load_config
from ..console import quiet_known_noise
from ...trainers.sampling import saved_bytes
from .steps import build_recipe

ARMS = {  # label → overrides (N is set per row)
    "alignprop K=N": ["trainer.algorithm=alignprop", "truncation.strategy=fixed", "truncation.k={n}"],
    "alignprop K=2": ["trainer.algorithm=alignprop", "truncation.strategy=fixed", "truncation.k=2"],
    "refl": ["trainer.algorithm=refl"],
    "draft_lv": ["trainer.algorithm=draft_lv"],
    "drtune K=3": ["trainer.algorithm=drtune", "drtune.train_steps=3"],
    "drtune K=3, full chain": ["trainer.algorithm=drtune", "drtune.train_steps=3", "drtune.stop_input_grad=false"],
    "direct_align": ["trainer.algorithm=direct_align"],
}


def graph_mb(preset: str, overrides: Sequence[str], n: int) -> tuple[float, int]:
    """(MB autograd saves while one micro-batch's training images are built, steps with a graph)."""
    cfg = load_config(preset, [*overrides, f"sampling.num_steps={n}", "sampling.checkpoint_unet=none",
                               "trainer.eval_every=0", "ray.num_workers=1", "deepspeed.zero_stage=1"])
    recipe = build_recipe(cfg, torch.device("cpu"))
    recipe.engine.train()
    prompts = recipe.pick_prompts(0, 0)
    (images, _, kept, _), saved = saved_bytes(recipe.denoiser, lambda: recipe.train_images(prompts, 0, 0))
    del images
    return saved / 2**20, kept


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="toy-count")
    parser.add_argument("--steps", default="10,20,40", help="the N to compare, comma-separated")
    args = parser.parse_args(argv)
    quiet_known_noise()
    torch.set_num_threads(1)
    ns = [int(v) for v in args.steps.split(",")]
    print(f"# {args.config}: MB autograd keeps for backward in one micro-batch (no activation checkpointing)")
    print("| algorithm | " + " | ".join(f"N={n} (steps with a graph)" for n in ns) + f" | N={ns[-1]} / N={ns[0]} |")
    print("|---|" + "---|" * (len(ns) + 1))
    for label, overrides in ARMS.items():
        cells = [graph_mb(args.config, [o.format(n=n) for o in overrides], n) for n in ns]
        row = " | ".join(f"{mb:.1f} ({kept})" for mb, kept in cells)
        print(f"| {label} | {row} | {cells[-1][0] / cells[0][0]:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
