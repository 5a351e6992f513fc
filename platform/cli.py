"""`alignprop` command line.

    alignprop train --config tiny-cpu [key=value ...]      # AlignProp through Ray Train + DeepSpeed
    alignprop tune --config tiny-cpu --space k_lr --num-samples 8   # sweep; one Ray Train run per trial
    alignprop compare --config toy-count --protocol paper  # each method at its own settings; cost ratios, CIs
    alignprop sample --config tiny-cpu --lora runs:/<id>/lora/final --prompt "a cat" --out samples/
    alignprop bench --config tiny-cpu [--json]              # s/step per phase, FLOPs, memory vs K, checkpointing
    alignprop soup --lora A --lora B --weights 0.7 0.3 --out DIR  # mix trained adapters
    alignprop tiny-model DIR [--family sd|sdxl|sd3]         # save a tiny offline pipeline
    alignprop rewards list                                  # rewards, what they load, whether weights are here
    alignprop register runs:/<id>/model --name NAME         # register a finished run's Model (trains nothing)
    alignprop presets                                       # the shipped presets, one line each
    alignprop config tiny-cpu [key=value ...]               # the resolved config as YAML
    alignprop runs show RUN                                 # a finished run's closing summary, from MLflow
    alignprop ui [--port 5000]                              # the MLflow UI of ./mlflow.db; stops on SIGTERM
    alignprop --version
    alignprop toy-world build DIR | path | eval [DIR]       # the pretrained toy world (platform/toy_world/cli.py)

Each subcommand is a parser function (`_add_<name>`) and a handler (`_<name>(args)`); the handlers
import their feature lazily, so `--help` and `presets` start without torch or Ray. Config errors are
one line naming the field, printed before Ray starts (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .console import quiet_known_noise
from .errors import ConfigError, RunBusyError, RunFailedError, UnsafeCheckpointError
from .presets import describe_preset, list_presets
from .toy_world import cli as toy_world_cli

ONE_LINE_ERRORS = (ConfigError, FileNotFoundError, RunBusyError, RunFailedError, UnsafeCheckpointError)


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help=f"preset ({', '.join(list_presets())}) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 truncation.k=5")


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")


def _with_flags(args: argparse.Namespace) -> list[str]:
    """The overrides plus what the flags set (`--address`, `--tracking-uri`, `--run-name`)."""
    extra = []
    for flag, key in (("address", "ray.address"), ("tracking_uri", "tracking.uri"), ("run_name", "tracking.run_name")):
        if getattr(args, flag, None):
            extra.append(f"{key}={getattr(args, flag)}")
    return list(args.overrides) + extra


def _load(args: argparse.Namespace, flags: bool = True):
    from .config import load_config

    return load_config(args.config, _with_flags(args) if flags else list(args.overrides))


# ----------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train LoRA adapters with AlignProp on Ray Train")
    _config_args(train)
    _cluster_args(train)
    train.add_argument("--run-name", help="run name (default: <config>-<hash>; same name = resume)")
    train.add_argument("--register",
                       help="register the run's MLflow Model (runs:/<id>/model) under this name, alias 'best'")
    train.add_argument("--dry-run", action="store_true", help="check the config, the services and the storage; "
                       "print the run name and whether it would resume; start nothing")


def _train(args: argparse.Namespace) -> None:
    from .launch import dry_run, launch
    from .launch.summary import print_summary

    if args.dry_run:
        print("\n".join(dry_run(_load(args))))
        return
    cfg = _load(args)
    print_summary(launch(cfg, register=args.register), cfg)


# ------------------------------------------------------------------------------------ tune
def _add_tune(sub) -> None:
    sweep = sub.add_parser("tune", help="Ray Tune sweep of AlignProp runs (one Ray Train run per trial)")
    _config_args(sweep)
    sweep.add_argument("--space", required=True, help="tune_spaces/<name>.yaml, a shipped space name, or a YAML path")
    sweep.add_argument("--num-samples", type=int, default=4, help="trials (per grid point)")
    sweep.add_argument("--max-concurrent", type=int, help="default: as many trials as the cluster's CPUs hold")
    sweep.add_argument("--name", help="sweep name (default: <config>-<space>; same name = resume)")
    sweep.add_argument("--trial-retries", type=int, default=0,
                       help="rerun a failed trial this often (it resumes from its checkpoint)")
    sweep.add_argument("--register",
                       help="register the best LoRA in the MLflow model registry under this name (alias 'best')")
    _cluster_args(sweep)


def _tune(args: argparse.Namespace) -> None:
    from .sweeps.space import load_space

    cfg = _load(args)
    spec = load_space(args.space, cfg)
    if args.num_samples < 1 or (args.max_concurrent is not None and args.max_concurrent < 1) or args.trial_retries < 0:
        raise ConfigError("--num-samples/--max-concurrent/--trial-retries: accepted: integers >= 1 (retries >= 0)")
    from .sweeps.tune import run_sweep

    from .sweeps.summary import closing_lines

    summary = run_sweep(cfg, spec, args.num_samples, args.max_concurrent, args.name, args.register, args.trial_retries)
    print("\n".join(closing_lines(summary, spec)), flush=True)


# --------------------------------------------------------------------------------- compare
def _add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="the methods compared fairly: per-arm lr sweeps on validation, "
                             "seeds on test, cost ratios with CIs (rerun = resume)")
    _config_args(compare)
    compare.add_argument("--protocol", default="paper", help="paper (5 arms, hours on 2 cores) | layout | layout3 "
                         "(DRTune, Direct-Align, AlignProp, ReFL at count 1 | 3) | tiny (the suite's)")
    compare.add_argument("--name", help="comparison name: its MLflow experiment and sweep prefix "
                         "(default: <config>-<protocol>; same name = resume)")
    compare.add_argument("--only", help="comma-separated arms (default: all of the protocol's)")
    compare.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs hold)")
    compare.add_argument("--skip-go-no-go", action="store_true", help="spend the RL budgets even if the first "
                         "short DDPO run's validation gold did not rise by 2 SE")
    _cluster_args(compare)


def _compare(args: argparse.Namespace) -> None:
    from .compare import PROTOCOLS, run_compare
    from .config import SAFE_NAME, SAFE_NAME_TEXT

    if args.protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol: got {args.protocol!r}; accepted: {', '.join(PROTOCOLS)}")
    name = args.name or f"{Path(args.config).stem}-{args.protocol}"
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"--name: got {name!r}; accepted: {SAFE_NAME_TEXT}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: got {args.max_concurrent}; accepted: an integer >= 1")
    run_compare(args.config, _with_flags(args), PROTOCOLS[args.protocol], name, args.only, args.max_concurrent,
                args.skip_go_no_go)


# ---------------------------------------------------------------------------------- sample
def _add_sample(sub) -> None:
    sample = sub.add_parser("sample", help="write PNGs with and without a trained LoRA")
    _config_args(sample, required=False)
    sample.add_argument("--lora", help="LoRA directory/file or MLflow artifact URI (runs:/<run_id>/lora/final); "
                        "an MLflow one brings its run's config (the default for --config)")
    sample.add_argument("--any-base", action="store_true",
                        help="sample a --config whose base model differs from the one the LoRA was trained on")
    sample.add_argument("--prompt", action="append", required=True, help="repeatable")
    sample.add_argument("--out", required=True, help="output directory")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--lora-scale", type=float, default=1.0,
                        help="the LoRA at this × its trained strength (default 1; e.g. 0.5 against over-optimisation)")
    sample.add_argument("--tracking-uri", help="MLflow URI used to resolve runs:/ LoRA URIs")


def _sample(args: argparse.Namespace) -> None:
    from .sample import sample_setup, write_samples

    if not 0 <= args.lora_scale <= 4:
        raise ConfigError(f"--lora-scale: got {args.lora_scale:g}; accepted: a number in [0, 4]")
    cfg, lora_path = sample_setup(args.config, _with_flags(args), args.lora, args.tracking_uri, args.any_base)
    for path in write_samples(cfg, args.prompt, args.out, args.lora, args.seed, args.tracking_uri, lora_path,
                              args.lora_scale):
        print(path)


# ------------------------------------------------------------------------------------ soup
def _add_soup(sub) -> None:
    soup = sub.add_parser("soup", help="mix trained LoRA adapters into one (exact low-rank sum, or the paper's "
                                       "parameter "
                                       "interpolation); --sweep: score the mix over a grid of α, logged to MLflow")
    soup.add_argument("--lora", action="append", required=True,
                      help="LoRA dir/file, runs:/ URI, or 'base' (the zero adapter: the base model); repeat")
    soup.add_argument("--weights", type=float, nargs="+", help="one weight per --lora (not with --sweep)")
    soup.add_argument("--mode", choices=["delta", "params"],
                      help="params: the paper's interpolation of A and B (default with --sweep); "
                           "delta: exact sum of updates (default otherwise)")
    soup.add_argument("--out", required=True,
                      help="the mixed adapter's directory; with --sweep: where the csv, plot and grids go")
    soup.add_argument("--tracking-uri",
                      help="MLflow URI used to resolve runs:/ LoRA URIs (and, with --sweep, to log the sweep run)")
    soup.add_argument("--sweep", help="start:stop:step, e.g. 0:1:0.1: mix α·A + (1−α)·B for each α (both ends "
                                      "included) with two --lora")
    _config_args(soup, required=False)
    soup.add_argument("--prompt", action="append",
                      help="with --sweep: held-out prompt, repeatable (default: trainer.eval_prompts)")
    soup.add_argument("--experiment",
                      help="with --sweep: MLflow experiment (default: tracking.experiment or the config's name)")
    soup.add_argument("--seed", type=int,
                      help="with --sweep: sampling seed, the same for every α (default: trainer.eval_seed)")


def _soup(args: argparse.Namespace) -> None:
    if args.sweep is not None:
        return _soup_sweep(args)
    from .sample import resolve_lora
    from .soup import is_base, soup

    if args.weights is None:
        raise ConfigError("--weights: required without --sweep; accepted: one weight per --lora (e.g. 0.7 0.3), "
                          "or --sweep start:stop:step")
    unused = [flag for flag, value in (("--config", args.config), ("--prompt", args.prompt),
                                       ("--experiment", args.experiment),
                                       ("--seed", args.seed), ("key=value overrides", args.overrides)) if value]
    if unused:
        raise ConfigError(f"{unused[0]}: only used with --sweep; accepted: --sweep start:stop:step, or leave it out")
    try:
        loras = [x if is_base(x) else str(resolve_lora(x, args.tracking_uri)) for x in args.lora]
        print(soup(loras, args.weights, args.out, args.mode or "delta"))
    except ValueError as err:  # one-line argument errors (counts, shapes, modes)
        raise ConfigError(str(err)) from None


def _soup_sweep(args: argparse.Namespace) -> None:
    from .prompt_files import read_prompt_file
    from .sample import resolve_lora
    from .soup import is_base
    from .soup.alpha_scan import check_sweep_args, format_table, run_soup_sweep
    from .tracking import resolve_tracking_uri

    alphas = check_sweep_args(args.sweep, args.lora, args.weights, args.config, args.mode)
    cfg = _load(args)
    prompts = list(args.prompt or cfg.trainer.eval_prompts)
    if not prompts and cfg.trainer.eval_prompt_file:
        prompts = list(read_prompt_file(cfg.trainer.eval_prompt_file, "trainer.eval_prompt_file"))
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("--prompt: no held-out prompts (none given, trainer.eval_prompts empty or blank); "
                          "accepted: --prompt TEXT (repeatable) or a config with trainer.eval_prompts")
    uri = resolve_tracking_uri(args.tracking_uri or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    loras = [x if is_base(x) else str(resolve_lora(x, uri)) for x in args.lora]
    try:
        result = run_soup_sweep(cfg, loras, args.lora, alphas, args.mode or "params", prompts,
                                cfg.trainer.eval_seed if args.seed is None else args.seed, uri,
                                args.experiment or cfg.tracking.experiment or cfg.name, args.out, args.sweep)
    except ValueError as err:  # one-line errors (adapters that cannot be mixed, bad store)
        raise ConfigError(str(err)) from None
    print(format_table(result.rows, result.labels))
    print(f"[alignprop] soup sweep: mlflow run {result.run_id} at {result.tracking_uri}; {result.csv_path}, "
          f"{result.plot_path}")


# ----------------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="seconds/step per phase, UNet FLOPs, MFU and peak memory over "
                                         "K × batch × checkpointing")
    _config_args(bench)
    bench.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up)")
    bench.add_argument("--k", help="comma-separated K values (default: 1, N/2, N)")
    bench.add_argument("--batch", help="comma-separated prompts per step (default: trainer.batch_size)")
    bench.add_argument("--checkpoint", default="all,none,auto",
                       help="comma-separated sampling.checkpoint_unet modes (default: all,none,auto)")
    bench.add_argument("--json", action="store_true", help="one JSON object per cell and line instead of a table")


def _bench(args: argparse.Namespace) -> None:
    from .bench.steps import parse_list, run_bench

    ks = parse_list(args.k, int, "--k", "comma-separated integers such as 1,5,50")
    batches = parse_list(args.batch, int, "--batch", "comma-separated integers such as 1,2,4")
    modes = parse_list(args.checkpoint, str, "--checkpoint", "comma-separated modes among all, none, auto")
    run_bench(_load(args, flags=False), args.steps, ks, batches, modes, args.json)


# -------------------------------------------------------------------------- small commands
def _add_tiny_model(sub) -> None:
    tiny = sub.add_parser("tiny-model", help="save a tiny offline pipeline (random weights) as a diffusers directory")
    tiny.add_argument("dir")
    tiny.add_argument("--family", choices=["sd", "sdxl", "sd3"], default="sd",
                      help="sd: SD 1.x-shaped (default); sdxl: two text encoders, added conditioning; sd3: "
                           "flow-matching MMDiT")


def _tiny_model(args: argparse.Namespace) -> None:
    from .models import save_tiny_pipeline

    print(save_tiny_pipeline(args.dir, args.family))


def _add_register(sub) -> None:
    register = sub.add_parser("register", help="register a finished run's MLflow Model under a name, alias 'best' "
                              "(trains nothing; `train --register` registers a new run)")
    register.add_argument("model", help="runs:/<run_id>/model")
    register.add_argument("--name", required=True, help="registered model name; models:/NAME@best then loads it")
    register.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")


def _register(args: argparse.Namespace) -> None:
    from .mlflow_model import check_model_name, register_model, run_id_of_model_uri

    run_id = run_id_of_model_uri(args.model)
    check_model_name(args.name, "--name")
    uri = _existing_store(args.tracking_uri)
    version = register_model(uri, args.name, run_id, flag="--name")
    print(f"[alignprop] registered {args.model} as {version}, alias best: models:/{args.name}@best at {uri}")


def _existing_store(tracking_uri: str | None) -> str:
    """The tracking URI (flag, MLFLOW_TRACKING_URI, ./mlflow.db), reachable and, for sqlite, existing."""
    from .tracking import probe_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    probe_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():  # MLflow would create it
        raise ConfigError(f"--tracking-uri: no MLflow store at {uri}; accepted: the store the run was tracked in "
                          "(--tracking-uri or MLFLOW_TRACKING_URI)")
    return uri


def _add_presets(sub) -> None:
    sub.add_parser("presets", help="list the shipped presets, one line each")


def _presets(args: argparse.Namespace) -> None:
    names = list_presets()
    width = max(map(len, names))
    print("\n".join(f"{name:<{width}}  {describe_preset(name)}" for name in names))


def _add_config(sub) -> None:
    config = sub.add_parser("config", help="print a preset (or YAML) with overrides applied, as the run would use it")
    config.add_argument("config", help=f"preset ({', '.join(list_presets())}) or YAML path")
    config.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 truncation.k=5")


def _config(args: argparse.Namespace) -> None:
    from .config import load_config, to_yaml

    print(to_yaml(load_config(args.config, list(args.overrides), paths=False)), end="")


def _add_rewards(sub) -> None:
    rewards = sub.add_parser("rewards", help="reward models: `alignprop rewards list`")
    rewards.add_argument("action", choices=["list"])


def _rewards(args: argparse.Namespace) -> None:
    from ..rewards import describe_rewards

    for row in describe_rewards():
        print(f"{row['name']:<16} {row['needs']}\n{'':<16} weights: {row['weights']}")


def _add_runs(sub) -> None:
    runs = sub.add_parser("runs", help="tracked runs: `alignprop runs show RUN` reprints a run's closing summary")
    runs.add_argument("action", choices=["show"])
    runs.add_argument("run", help="an alignprop run name (the newest run of that name) or an MLflow run id")
    runs.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")


def _runs(args: argparse.Namespace) -> None:
    from .launch.show import show_run

    uri = _existing_store(args.tracking_uri)
    print("\n".join(show_run(uri, args.run)))


def _add_ui(sub) -> None:
    ui = sub.add_parser("ui", help="the MLflow UI of a tracking store on 127.0.0.1 (stops on Ctrl-C or SIGTERM)")
    ui.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")


def _ui(args: argparse.Namespace) -> None:
    from .tracking import resolve_tracking_uri
    from .tracking.ui_server import serve_ui

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: got {args.port}; accepted: 1-65535")
    uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    sys.exit(serve_ui(uri, args.host, args.port))


# (parser, handler) per subcommand, in the order `--help` lists them
COMMANDS = {
    "train": (_add_train, _train), "tune": (_add_tune, _tune), "compare": (_add_compare, _compare),
    "sample": (_add_sample, _sample),
    "bench": (_add_bench, _bench), "soup": (_add_soup, _soup), "tiny-model": (_add_tiny_model, _tiny_model),
    "register": (_add_register, _register), "presets": (_add_presets, _presets), "config": (_add_config, _config),
    "rewards": (_add_rewards, _rewards), "runs": (_add_runs, _runs), "ui": (_add_ui, _ui),
    "toy-world": (toy_world_cli.add_parser, toy_world_cli.run),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignprop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"alignprop {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alignprop-platform")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_known_noise()
    try:
        COMMANDS[args.command][1](args)
    except ONE_LINE_ERRORS as err:
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
