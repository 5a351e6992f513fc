"""`alignprop` command line.

    alignprop train --config tiny-cpu [key=value ...]      # AlignProp through Ray Train + DeepSpeed
    alignprop tune --config tiny-cpu --space k_lr --num-samples 8   # sweep; one Ray Train run per trial
    alignprop sample --config tiny-cpu --lora runs:/<id>/lora/final --prompt "a cat" --out samples/
    alignprop bench --config tiny-cpu [--json]              # s/step per phase, FLOPs, memory vs K, checkpointing
    alignprop soup --lora A --lora B --weights 0.7 0.3 --out DIR  # mix trained adapters
    alignprop tiny-model DIR [--family sd|sdxl|sd3]         # save a tiny offline pipeline
    alignprop rewards list                                  # rewards, what they load, whether weights are here
    alignprop presets                                       # list the shipped presets
    alignprop toy-world build DIR | path | eval [DIR]       # the pretrained toy world (platform/toy_world/cli.py)

Config errors are one line naming the field, printed before Ray starts (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, list_presets, load_config
from .errors import RunBusyError, UnsafeCheckpointError
from .console import quiet_known_noise


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help=f"preset ({', '.join(list_presets())}) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 truncation.k=5")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignprop", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train LoRA adapters with AlignProp on Ray Train")
    _config_args(train)
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    train.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    train.add_argument("--run-name", help="run name (default: <config>-<hash>; same name = resume)")
    train.add_argument("--register", help="register the run's MLflow Model (runs:/<id>/model) under this name, alias 'best'")
    sweep = sub.add_parser("tune", help="Ray Tune sweep of AlignProp runs (one Ray Train run per trial)")
    _config_args(sweep)
    sweep.add_argument("--space", required=True, help="tune_spaces/<name>.yaml, a shipped space name, or a YAML path")
    sweep.add_argument("--num-samples", type=int, default=4, help="trials (per grid point)")
    sweep.add_argument("--max-concurrent", type=int, help="default: as many trials as the cluster's CPUs hold")
    sweep.add_argument("--name", help="sweep name (default: <config>-<space>; same name = resume)")
    sweep.add_argument("--trial-retries", type=int, default=0, help="rerun a failed trial this often (it resumes from its checkpoint)")
    sweep.add_argument("--register", help="register the best LoRA in the MLflow model registry under this name (alias 'best')")
    sweep.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sweep.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    sample = sub.add_parser("sample", help="write PNGs with and without a trained LoRA")
    _config_args(sample)
    sample.add_argument("--lora", help="LoRA directory/file or MLflow artifact URI (runs:/<run_id>/lora/final)")
    sample.add_argument("--prompt", action="append", required=True, help="repeatable")
    sample.add_argument("--out", required=True, help="output directory")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--tracking-uri", help="MLflow URI used to resolve runs:/ LoRA URIs")
    bench = sub.add_parser("bench", help="seconds/step per phase, UNet FLOPs, MFU and peak memory over K × batch × checkpointing")
    _config_args(bench)
    bench.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up)")
    bench.add_argument("--k", help="comma-separated K values (default: 1, N/2, N)")
    bench.add_argument("--batch", help="comma-separated prompts per step (default: trainer.batch_size)")
    bench.add_argument("--checkpoint", default="all,none,auto", help="comma-separated sampling.checkpoint_unet modes (default: all,none,auto)")
    bench.add_argument("--json", action="store_true", help="one JSON object per cell and line instead of a table")
    soup = sub.add_parser("soup", help="mix trained LoRA adapters into one (exact low-rank sum, or the paper's parameter "
                                       "interpolation); --sweep: score the mix over a grid of α, logged to MLflow")
    soup.add_argument("--lora", action="append", required=True,
                      help="LoRA dir/file, runs:/ URI, or 'base' (the zero adapter: the base model); repeat")
    soup.add_argument("--weights", type=float, nargs="+", help="one weight per --lora (not with --sweep)")
    soup.add_argument("--mode", choices=["delta", "params"],
                      help="params: the paper's interpolation of A and B (default with --sweep); delta: exact sum of updates (default otherwise)")
    soup.add_argument("--out", required=True, help="the mixed adapter's directory; with --sweep: where the csv, plot and grids go")
    soup.add_argument("--tracking-uri", help="MLflow URI used to resolve runs:/ LoRA URIs (and, with --sweep, to log the sweep run)")
    soup.add_argument("--sweep", help="start:stop:step, e.g. 0:1:0.1: mix α·A + (1−α)·B for each α (both ends included) with two --lora")
    soup.add_argument("--config", help=f"with --sweep: preset ({', '.join(list_presets())}) or YAML path")
    soup.add_argument("overrides", nargs="*", help="with --sweep: key=value config overrides, e.g. sampling.num_steps=20")
    soup.add_argument("--prompt", action="append", help="with --sweep: held-out prompt, repeatable (default: trainer.eval_prompts)")
    soup.add_argument("--experiment", help="with --sweep: MLflow experiment (default: tracking.experiment or the config's name)")
    soup.add_argument("--seed", type=int, help="with --sweep: sampling seed, the same for every α (default: trainer.eval_seed)")
    tiny = sub.add_parser("tiny-model", help="save a tiny offline pipeline (random weights) as a diffusers directory")
    tiny.add_argument("dir")
    tiny.add_argument("--family", choices=["sd", "sdxl", "sd3"], default="sd",
                      help="sd: SD 1.x-shaped (default); sdxl: two text encoders, added conditioning; sd3: flow-matching MMDiT")
    sub.add_parser("presets", help="list the shipped presets")
    rewards = sub.add_parser("rewards", help="reward models: `alignprop rewards list`")
    rewards.add_argument("action", choices=["list"])
    from .toy_world.cli import add_parser as add_toy_world_parser

    add_toy_world_parser(sub)
    return parser


def _with_flags(args: argparse.Namespace) -> list[str]:
    extra = []
    for flag, key in (("address", "ray.address"), ("tracking_uri", "tracking.uri"), ("run_name", "tracking.run_name")):
        if getattr(args, flag, None):
            extra.append(f"{key}={getattr(args, flag)}")
    return list(args.overrides) + extra


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_known_noise()
    try:
        if args.command == "presets":
            print("\n".join(list_presets()))
        elif args.command == "rewards":
            from ..rewards import describe_rewards

            for row in describe_rewards():
                print(f"{row['name']:<16} {row['needs']}\n{'':<16} weights: {row['weights']}")
        elif args.command == "toy-world":
            from .toy_world.cli import run as run_toy_world

            run_toy_world(args)
        elif args.command == "tiny-model":
            from .models import save_tiny_pipeline

            print(save_tiny_pipeline(args.dir, args.family))
        elif args.command == "train":
            from .launch import launch
            from .launch.summary import print_summary

            print_summary(launch(load_config(args.config, _with_flags(args)), register=args.register))
        elif args.command == "tune":
            from .sweeps.space import load_space

            cfg = load_config(args.config, _with_flags(args))
            spec = load_space(args.space, cfg)
            if args.num_samples < 1 or (args.max_concurrent is not None and args.max_concurrent < 1) or args.trial_retries < 0:
                raise ConfigError("--num-samples/--max-concurrent/--trial-retries: accepted: integers >= 1 (retries >= 0)")
            from .sweeps.tune import run_sweep

            run_sweep(cfg, spec, args.num_samples, args.max_concurrent, args.name, args.register, args.trial_retries)
        elif args.command == "sample":
            from .sample import write_samples

            cfg = load_config(args.config, _with_flags(args))
            for path in write_samples(cfg, args.prompt, args.out, args.lora, args.seed, args.tracking_uri):
                print(path)
        elif args.command == "soup" and args.sweep is not None:
            from .soup.alpha_scan import check_sweep_args, format_table, run_soup_sweep

            alphas = check_sweep_args(args.sweep, args.lora, args.weights, args.config, args.mode)
            cfg = load_config(args.config, _with_flags(args))
            prompts = list(args.prompt or cfg.trainer.eval_prompts)
            if not prompts and getattr(cfg.trainer, "eval_prompt_file", None):
                from .prompt_files import read_prompt_file

                prompts = list(read_prompt_file(cfg.trainer.eval_prompt_file, "trainer.eval_prompt_file"))
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ConfigError("--prompt: no held-out prompts (none given, trainer.eval_prompts empty or blank); accepted: --prompt TEXT (repeatable) or a config with trainer.eval_prompts")
            from .sample import resolve_lora
            from .soup.mix import is_base
            from .tracking import resolve_tracking_uri

            uri = resolve_tracking_uri(args.tracking_uri or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
            loras = [x if is_base(x) else str(resolve_lora(x, uri)) for x in args.lora]
            try:
                result = run_soup_sweep(cfg, loras, args.lora, alphas, args.mode or "params", prompts,
                                        cfg.trainer.eval_seed if args.seed is None else args.seed, uri,
                                        args.experiment or cfg.tracking.experiment or cfg.name, args.out, args.sweep)
            except ValueError as err:  # one-line errors (adapters that cannot be mixed, bad store)
                raise ConfigError(str(err)) from None
            print(format_table(result.rows, result.labels))
            print(f"[alignprop] soup sweep: mlflow run {result.run_id} at {result.tracking_uri}; {result.csv_path}, {result.plot_path}")
        elif args.command == "soup":
            from .sample import resolve_lora
            from .soup.mix import is_base, soup

            if args.weights is None:
                raise ConfigError("--weights: required without --sweep; accepted: one weight per --lora (e.g. 0.7 0.3), or --sweep start:stop:step")
            unused = [flag for flag, value in (("--config", args.config), ("--prompt", args.prompt), ("--experiment", args.experiment),
                                               ("--seed", args.seed), ("key=value overrides", args.overrides)) if value]
            if unused:
                raise ConfigError(f"{unused[0]}: only used with --sweep; accepted: --sweep start:stop:step, or leave it out")
            try:
                loras = [x if is_base(x) else str(resolve_lora(x, args.tracking_uri)) for x in args.lora]
                print(soup(loras, args.weights, args.out, args.mode or "delta"))
            except ValueError as err:  # one-line argument errors (counts, shapes, modes)
                raise ConfigError(str(err)) from None
        elif args.command == "bench":
            from .bench.steps import parse_list, run_bench

            ks = parse_list(args.k, int, "--k", "comma-separated integers such as 1,5,50")
            batches = parse_list(args.batch, int, "--batch", "comma-separated integers such as 1,2,4")
            modes = parse_list(args.checkpoint, str, "--checkpoint", "comma-separated modes among all, none, auto")
            run_bench(load_config(args.config, list(args.overrides)), args.steps, ks, batches, modes, args.json)
    except (ConfigError, FileNotFoundError, RunBusyError, UnsafeCheckpointError) as err:
        print(f"alignprop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nalignprop: interrupted; the MLflow run is marked KILLED. Rerun the same command to resume "
              "from the last checkpoint.", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now: Ray threads may still be blocked in calls that a normal interpreter shutdown
        # would wait for. A local Ray's daemons and workers die with this process.
        os._exit(130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
