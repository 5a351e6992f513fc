"""Launch one AlignProp run on Ray Train (local Ray by default, a cluster via ray.address/RAY_ADDRESS).

    alignprop train --config tiny-cpu                       # local Ray, ./mlflow.db
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- alignprop train --config tiny-cpu

Rerunning with the same run name (deterministic, see `config.run_name`) and storage path resumes
from the last committed checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import ConfigError, RunConfig, flatten, from_dict, read_prompt_file, run_name, to_dict, to_yaml
from ..console import close_progress_bars, filter_ray_worker_logs, quiet_known_noise
from ..tracking import probe_tracking_uri, prompt_sets, resolve_tracking_uri, run_lock, tracked_run


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: Optional[str]  # the last checkpoint directory (Ray storage)
    metrics: dict[str, Any]
    model_uri: Optional[str] = None  # the run's MLflow Model: runs:/<run_id>/model
    registered: Optional[str] = None  # with --register NAME: models:/NAME/<version>, which alias `best` now names


def resolve_storage_path(storage_path: Optional[str]) -> str:
    """None → ~/ray_results; local paths absolute (the driver's view); URIs (s3://, gs://) as given."""
    if storage_path and "://" in storage_path:
        return storage_path
    return str(Path(storage_path or "~/ray_results").expanduser().resolve())


def resolved_tracking_uri(cfg: RunConfig) -> str:
    return resolve_tracking_uri(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry: build the recipe, resume from Ray's checkpoint, train."""
    quiet_known_noise()  # before DeepSpeed and diffusers are imported below
    import ray.train
    import ray.train.torch
    import torch

    from ...trainers.alignprop import AlignPropRecipe, WorkerContext

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _quiet_ray_train_reports()
    cfg, context = from_dict(config["run"]), ray.train.get_context()
    if config.get("prompts"):  # read on the driver: workers run elsewhere (other cwd, other nodes)
        cfg.trainer.prompts, cfg.trainer.prompt_file = list(config["prompts"]), None
    if config.get("eval_prompts"):
        cfg.trainer.eval_prompts, cfg.trainer.eval_prompt_file = list(config["eval_prompts"]), None

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        recipe = AlignPropRecipe(cfg, WorkerContext(
            rank=context.get_world_rank(), world_size=context.get_world_size(),
            device=ray.train.torch.get_device(), report=report, resume_dir=resume_dir,
            tracking_uri=config["tracking_uri"], run_id=config["run_id"], progress_lines=config.get("progress_lines", False),
        )).setup()
    recipe.train()


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every report of every rank at INFO (the whole metrics dict, per step);
    our rank-0 progress bar and MLflow already carry them."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that internal module: keep its logging
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    """What one Train worker reserves (Ray Train's rule: CPU 1 by default, GPU 1 with use_gpu)."""
    per = {k: float(v) for k, v in cfg.ray.resources_per_worker.items() if v} or ({} if cfg.ray.use_gpu else {"CPU": 1.0})
    if cfg.ray.use_gpu:
        per.setdefault("GPU", 1.0)
    return per


def ray_address(cfg: RunConfig) -> Optional[str]:
    """The cluster to join (ray.address, else RAY_ADDRESS), probed with a short timeout; None: a
    new local Ray of our own (never an unrelated `ray start` cluster found on this machine)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    if address != "auto":
        hostport = address.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        default = 10001 if address.startswith("ray://") else 8265 if address.startswith("http") else 6379
        host, port = (host or hostport), (int(port) if port.isdigit() else default)
        try:
            socket.create_connection((host.strip("[]"), port), timeout=5).close()
        except OSError as err:
            raise ConfigError(f"ray.address: cannot reach {address} ({err.strerror or err}); accepted: a running cluster "
                              "(the address `ray start --head` prints, or ray://<head>:10001), or unset for a local Ray") from None
    return address


def check_local_resources(cfg: RunConfig) -> None:
    """Before starting a local Ray: refuse what this machine cannot hold (no waiting forever)."""
    import torch

    have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    _check_fits(cfg, have, "this machine")


def _check_fits(cfg: RunConfig, have: dict[str, float], where: str) -> None:
    per, n = worker_resources(cfg), cfg.ray.num_workers
    for key, amount in per.items():
        if amount * n > have.get(key, 0.0) + 1e-9:
            shown = ", ".join(f"{k}: {v:g}" for k, v in sorted(have.items()) if not k.startswith(("node:", "memory", "object_store")))
            raise ConfigError(f"ray.num_workers/ray.resources_per_worker: {n} workers × {{{key}: {amount:g}}} need {key} {amount * n:g} "
                              f"but {where} has {{{shown}}}; accepted: fewer workers or smaller resources_per_worker"
                              + ("" if key != "GPU" else ", or ray.use_gpu=false"))


def wait_for_cluster_resources(cfg: RunConfig) -> None:
    """On a cluster: the resources must exist, or appear (autoscaling) within ray.resource_wait_s."""
    import ray

    wait = 600.0 if cfg.ray.resource_wait_s is None else cfg.ray.resource_wait_s
    deadline = time.monotonic() + wait
    while True:
        try:
            _check_fits(cfg, ray.cluster_resources(), "the cluster")
            return
        except ConfigError as err:
            if time.monotonic() >= deadline:
                raise
            print(f"[alignprop] waiting up to {deadline - time.monotonic():.0f} s for the cluster to scale up ({err}); "
                  "Ctrl-C stops, ray.resource_wait_s=0 fails at once", file=sys.stderr, flush=True)
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def init_ray(address: Optional[str]) -> bool:
    """Join `address`, or start a local Ray bound to 127.0.0.1 only. Returns True if this call
    started Ray (the caller shuts it down), False if Ray was already initialised or a cluster joined."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        from .loopback import enter_loopback_mode

        enter_loopback_mode()
        # Ray Train's actors query the state API with no address: with another Ray on this machine
        # that auto-detection fails ("Found multiple active Ray instances"). Name ours to them.
        dashboard_port = free_local_port()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}})
        filter_ray_worker_logs()
        return True
    ray.init(address=address, log_to_driver=True, configure_logging=False)
    filter_ray_worker_logs()
    return False


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_trainer(cfg: RunConfig, tracking_uri: str, run_id: str, callbacks: Sequence[Any] = (),
                  storage_path: Optional[str] = None):
    """The TorchTrainer of one run; the same for `alignprop train` and every sweep trial."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loopback import LoopbackTorchConfig, on_loopback_node

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id,
                           "progress_lines": not sys.stderr.isatty(),  # where the driver prints what rank 0 does
                           "prompts": read_prompt_file(cfg.trainer.prompt_file) if cfg.trainer.prompt_file else None,
                           "eval_prompts": (read_prompt_file(cfg.trainer.eval_prompt_file, "trainer.eval_prompt_file")
                                            if cfg.trainer.eval_prompt_file else None)},
        # On our loopback Ray the c10d rendezvous listens on 127.0.0.1 too (platform/launch/loopback.py).
        torch_config=(LoopbackTorchConfig if on_loopback_node() else TorchConfig)(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=dict(cfg.ray.resources_per_worker) or None,
        ),
        run_config=RayRunConfig(
            name=run_name(cfg), storage_path=storage_path or resolve_storage_path(cfg.ray.storage_path),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread, so Ctrl-C reaches this (main) thread at once.

    Ray Train's fit() in the main thread installs its own SIGINT handler, which waits for the
    controller to abort (forever if the workers never started) and then exits the process with
    `sys.exit`, past our handlers. Off the main thread it installs none; the caller turns the
    KeyboardInterrupt into a KILLED run and exits, which ends the controller and workers."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="alignprop-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    close_progress_bars()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def check_resume_safety(storage: str, name: str) -> None:
    """Refuse, before anything starts, checkpoints holding files we would not load (pickles)."""
    if "://" in storage:
        return  # remote storage: the worker checks the checkpoint it is given
    from ...trainers.checkpoint import check_checkpoint_files

    for directory in sorted((Path(storage) / name).glob("checkpoint_*")):
        if directory.is_dir():
            check_checkpoint_files(directory)


def launch(cfg: RunConfig, register: Optional[str] = None) -> TrainOutcome:
    """Check what can be checked, take the run's lock, start (or join) Ray, open the MLflow run,
    fit, log the run's MLflow Model (and register it as `register`, alias `best`). The run ends
    FINISHED, FAILED, or KILLED (Ctrl-C); a local Ray we started is shut down."""
    import ray

    from ..mlflow_model import check_model_name, log_run_model, register_model

    if register is not None:
        check_model_name(register)
    name, uri = run_name(cfg), resolved_tracking_uri(cfg)
    storage = resolve_storage_path(cfg.ray.storage_path)
    address = ray_address(cfg)
    if address is None and not ray.is_initialized():
        check_local_resources(cfg)
    probe_tracking_uri(uri)
    check_resume_safety(storage, name)
    started = False
    try:
        with run_lock(storage, name):
            started = init_ray(address)
            wait_for_cluster_resources(cfg)
            with tracked_run(uri, cfg.tracking.experiment or cfg.name, name, flatten(to_dict(cfg)), to_yaml(cfg),
                             datasets=prompt_sets(cfg)) as run_id:
                print(f"[alignprop] run {name}  mlflow {uri} run_id={run_id}", file=sys.stderr)
                result = fit_interruptibly(build_trainer(cfg, uri, run_id))
                model_uri = log_run_model(uri, run_id)
                registered = register_model(uri, register, run_id) if register else None
    except KeyboardInterrupt:
        # The fit thread still uses Ray: shutting Ray down under it makes Ray's core worker end the
        # process. The process exit ends it all instead (the CLI exits at once): a local Ray's
        # daemons share our fate (kill-on-parent-death), and a cluster kills the Train controller
        # (and so the workers) whose owner, this driver, is gone.
        started = False
        raise
    finally:
        if started:
            ray.shutdown()
    return TrainOutcome(
        run_name=name, mlflow_run_id=run_id, tracking_uri=uri,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}), model_uri=model_uri, registered=registered,
    )
