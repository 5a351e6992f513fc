"""`alignprop toy-world`: build the toy-world pipeline, print where the shipped one is, judge one.

    alignprop toy-world build DIR --seed 0 --budget-min 19     # pretrain (resumable: rerun the same command)
    alignprop toy-world path                                   # the shipped pipeline's directory (last line)
    alignprop toy-world eval [DIR] --prompts 96 --seeds 2 --grid samples.png [--record]
    alignprop toy-world build-rewards [DIR] --budget-min 3     # the learned rewards toy_count, toy_color

`eval` samples held-out captions (25 DDIM steps, guidance 5 by default) and prints the analytic
judge's colour match and count accuracy; `--record` writes them into DIR/BUILD.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError
from .scenes import SHIPPED_DIR, shown_path

# build flags → (type, help); unset flags take BuildOptions' defaults (pretrain.py imports torch: not at parse time)
_BUILD_FLAGS = {
    "seed": (int, "data and noise seed (default 0)"),
    "budget_min": (float, "wall-clock budget in minutes for both phases (default 19)"),
    "vae_share": (float, "share of the budget for the VAE (default 0.15)"),
    "replay": (str, "a finished build's build.json: repeat that build step for step (its options and plan; no budget)"),
    "vae_batch": (int, "default 16"), "unet_batch": (int, "default 32"),
    "vae_lr": (float, "default 2e-3"), "unet_lr": (float, "default 2e-3"),
    "ema_decay": (float, "EMA of the UNet weights that ships (default 0.995; 0: raw weights)"),
    "decay_share": (float, "share of each phase's steps that decays the learning rate linearly to 0 (default 0.4)"),
    "snr_gamma": (float, "min-SNR-γ weighting of the loss (default 5; 0: plain MSE)"),
    "zero_snr": (lambda v: {"true": True, "false": False}[v.lower()],
                 "true (default): v-prediction on a zero-terminal-SNR schedule, trailing DDIM; false: ε on SD's "
                 "schedule"),
    "caption_dropout": (float, "share of empty captions, for classifier-free guidance (default 0.1)"),
    "count_weights": (str, "share of the UNet's images per count one..four (default 1,2,3,3)"),
    "dataset_size": (int, "encoded images the UNet trains on (default 16384)"),
    "eval_prompts": (int, "held-out captions judged in the closing summary (default 24; 0: none)"),
}


def add_parser(sub) -> None:
    """The `toy-world` subcommand's arguments."""
    toy = sub.add_parser("toy-world", help="the toy world: pretrain its pipeline (build), print the shipped "
                                           "pipeline's directory (path), judge a pipeline on held-out captions (eval)")
    toy.add_argument("action", choices=["build", "path", "eval", "build-rewards"])
    toy.add_argument("dir", nargs="?", help="build: output directory; eval, build-rewards: a pipeline directory "
                                            "(default: the shipped one)")
    group = toy.add_argument_group("build")
    for name, (kind, text) in _BUILD_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    group = toy.add_argument_group("eval")
    group.add_argument("--prompts", type=int, default=96, help="held-out captions to sample (at most 96)")
    group.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    group.add_argument("--steps", type=int, default=25, help="DDIM steps")
    group.add_argument("--guidance", type=float, default=5.0)
    group.add_argument("--grid", help="write a PNG grid of the first 32 samples here")
    group.add_argument("--record", action="store_true", help="write the numbers into DIR/BUILD.md")


def run(args: argparse.Namespace) -> None:
    if args.action == "path":
        if not (SHIPPED_DIR / "model_index.json").exists():
            raise ConfigError(f"toy-world path: no shipped pipeline at {SHIPPED_DIR}; accepted: rebuild it with the "
                              f"command in {SHIPPED_DIR / 'BUILD.md'}")
        print(SHIPPED_DIR)
    elif args.action == "build":
        if not args.dir:
            raise ConfigError("toy-world build: DIR missing; accepted: alignprop toy-world build DIR [--seed N] "
                              "[--budget-min M]")
        from .pretrain import BuildOptions, build

        opts = BuildOptions(**{name: getattr(args, name) for name in _BUILD_FLAGS if getattr(args, name) is not None})
        result = build(args.dir, opts, command=" ".join(["alignprop", *map(shlex.quote, sys.argv[1:])]))
        print(result.summary())
        print(result.directory)
    elif args.action == "build-rewards":
        from .reward_training import train_rewards

        directory = Path(args.dir or SHIPPED_DIR)
        if not (directory / "model_index.json").exists():
            raise ConfigError(f"toy-world build-rewards: {directory} is not a built toy-world pipeline; accepted: a "
                              "DIR "
                              f"from `alignprop toy-world build DIR` (its VAE shapes the training images)")
        print(train_rewards(directory, seed=args.seed or 0, budget_min=args.budget_min or 3.0))
        print(directory / "rewards")
    else:
        _evaluate(args)


def _evaluate(args: argparse.Namespace) -> None:
    from .judge import evaluate, grid
    from .scenes import HELDOUT_CAPTIONS
    from .pretrain import load_toy_pipeline, write_build_section

    directory = Path(args.dir or SHIPPED_DIR)
    if not (directory / "model_index.json").exists():
        raise ConfigError(f"toy-world eval: {directory} is not a diffusers pipeline directory; accepted: a built "
                          "toy-world DIR")
    if not 1 <= args.prompts <= len(HELDOUT_CAPTIONS) or args.seeds < 1 or args.steps < 1:
        raise ConfigError(f"--prompts/--seeds/--steps: got {args.prompts}/{args.seeds}/{args.steps}; "
                          f"accepted: 1 <= prompts <= {len(HELDOUT_CAPTIONS)}, seeds >= 1, steps >= 1")
    report = evaluate(load_toy_pipeline(directory), [c.text for c in HELDOUT_CAPTIONS[:args.prompts]],
                      seeds=range(args.seeds), steps=args.steps, guidance=args.guidance)
    line = f"held-out, {args.steps} DDIM steps, guidance {args.guidance:g}: {report.summary()}"
    print(line)
    if args.grid:
        grid(report.images[:32], captions=report.prompts[:32]).save(args.grid)
        print(args.grid)
    if args.record:
        write_build_section(directory, "Quality bar", f"`alignprop toy-world eval {shown_path(directory)} --prompts "
                                                      f"{args.prompts} --seeds {args.seeds}`: {line}",
                                                      "Toy-world pipeline")
