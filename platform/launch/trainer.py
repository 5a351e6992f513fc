"""The Ray Train side of a run: the TorchTrainer every `alignprop train` and every sweep trial builds,
the per-worker entry that runs the recipe, and `fit()` in a thread that Ctrl-C can interrupt.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, Sequence

from ..config import RunConfig, from_dict, read_prompt_file, run_name, to_dict
from ..console import close_progress_bars, quiet_known_noise
from ..errors import RunFailedError
from .loopback import LoopbackTorchConfig, on_loopback_node
from .session import resolve_storage_path
from .storage import report_checkpoint, resume_directory


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry: build the recipe, resume from Ray's checkpoint, train."""
    quiet_known_noise()  # before DeepSpeed and diffusers are imported below
    import ray.train
    import ray.train.torch
    import torch

    from ...trainers.alignprop import AlignPropRecipe, WorkerContext

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _quiet_ray_train_reports()
    _quiet_run_failures()
    cfg, context = from_dict(config["run"]), ray.train.get_context()
    if config.get("prompts"):  # read on the driver: workers run elsewhere (other cwd, other nodes)
        cfg.trainer.prompts, cfg.trainer.prompt_file = list(config["prompts"]), None
    if config.get("eval_prompts"):
        cfg.trainer.eval_prompts, cfg.trainer.eval_prompt_file = list(config["eval_prompts"]), None
    if config.get("val_prompts"):
        cfg.trainer.val_prompts, cfg.trainer.val_prompt_file = list(config["val_prompts"]), None

    def ray_report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        if checkpoint_dir is None:
            return ray_report(metrics, None)
        report_checkpoint(ray_report, metrics, checkpoint_dir, config.get("storage_path"))

    with resume_directory(ray.train.get_checkpoint(), context.get_world_rank()) as resume_dir:
        recipe = AlignPropRecipe(cfg, WorkerContext(
            rank=context.get_world_rank(), world_size=context.get_world_size(),
            device=ray.train.torch.get_device(), report=report, resume_dir=resume_dir,
            tracking_uri=config["tracking_uri"], run_id=config["run_id"], progress_lines=config.get(
                "progress_lines", False),
            progress=config.get("progress", True),
        )).setup()
    recipe.train()


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every report of every rank at INFO (the whole metrics dict, per step);
    our rank-0 progress bar and MLflow already carry them."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that internal module: keep its logging
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class _DropRunFailure(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback while the error is a `RunFailedError`:
    its one line reaches the driver (`fit_interruptibly`), which prints it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(sys.exc_info()[1], RunFailedError)


def _quiet_run_failures() -> None:
    """In a worker: Ray Train logs the traceback of whatever ends the training function; a full disk or a
    diverging loss is one line (errors.RunFailedError), not a traceback per worker."""
    logger = logging.getLogger("ray.train.v2._internal.util")  # where Ray formats the worker's exception
    if not any(isinstance(f, _DropRunFailure) for f in logger.filters):
        logger.addFilter(_DropRunFailure())


def build_trainer(cfg: RunConfig, tracking_uri: str, run_id: str, callbacks: Sequence[Any] = (),
                  storage_path: Optional[str] = None, progress: bool = True):
    """The TorchTrainer of one run; the same for `alignprop train` and every sweep trial (where the
    driver prints each trial's progress: `progress=False` turns rank 0's bar off)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path = storage_path or resolve_storage_path(cfg.ray.storage_path)

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id,
                           "storage_path": f"{storage_path}/{run_name(cfg)}",
                           "progress_lines": not sys.stderr.isatty(),  # where the driver prints what rank 0 does
                           "progress": progress,
                           "prompts": read_prompt_file(cfg.trainer.prompt_file) if cfg.trainer.prompt_file else None,
                           "eval_prompts": (read_prompt_file(cfg.trainer.eval_prompt_file, "trainer.eval_prompt_file")
                                            if cfg.trainer.eval_prompt_file else None),
                           "val_prompts": (read_prompt_file(cfg.trainer.val_prompt_file, "trainer.val_prompt_file")
                                           if cfg.trainer.val_prompt_file else None)},
        # On our loopback Ray the c10d rendezvous listens on 127.0.0.1 too (platform/launch/loopback.py).
        torch_config=(LoopbackTorchConfig if on_loopback_node() else TorchConfig)(
            backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=dict(cfg.ray.resources_per_worker) or None,
        ),
        run_config=RayRunConfig(
            name=run_name(cfg), storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints),
            callbacks=list(callbacks),
            # The controller logs each worker failure with its traceback at INFO ("[FailurePolicy] RAISE");
            # the driver raises it (a RunFailedError as one line), and Ray's own warnings stay on the console.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread, so Ctrl-C reaches this (main) thread at once (`run_interruptibly`).
    A worker that stopped with a `RunFailedError` (a full disk, a NaN loss) fails the fit with that
    error's one line instead of Ray's traceback of every worker."""
    try:
        return run_interruptibly(trainer.fit)
    except Exception as err:
        cause = run_failure(err)
        if cause is None:
            raise
        raise type(cause)(str(cause)) from None


def run_failure(err: BaseException) -> Optional[RunFailedError]:
    """The `RunFailedError` a worker raised, inside Ray Train's WorkerGroupError (each worker's exception
    travels wrapped with its traceback), or None."""
    for failure in getattr(err, "worker_failures", {}).values():
        for exc in (failure, getattr(failure, "_base_exc", None), failure.__cause__):
            if isinstance(exc, RunFailedError):
                return exc
    return err if isinstance(err, RunFailedError) else None


def run_interruptibly(call: Callable[[], Any]):
    """`call()` (a TorchTrainer's fit, a Tune run) in a helper thread, so Ctrl-C reaches this (main)
    thread at once.

    Ray Train's fit() in the main thread installs its own SIGINT handler, which waits for the
    controller to abort (forever if the workers never started) and then exits the process with
    `sys.exit`, past our handlers. Off the main thread it installs none; the caller turns the
    KeyboardInterrupt into a KILLED run and exits, which ends the controller and workers."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="alignprop-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    close_progress_bars()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
