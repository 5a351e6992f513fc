"""The stack's known console noise, filtered where it is raised; everything else still shows.

`quiet_known_noise()` runs first in the CLI and in every Train worker: it drops a few exact
messages (logging filters and warning filters matched on the message, never a whole logger or
category). Lines that Ray's own actors print (the Train controller, DeepSpeed's `print`s in the
workers) cannot be filtered in those processes; `filter_ray_worker_logs()` drops the same known
lines where the driver prints what Ray streams to it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager

# (pattern, what it is). Each is expected and says nothing the user can act on.
KNOWN_NOISE: list[tuple[str, str]] = [
    (r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
     "transformers 5, when diffusers imports the CLIP/SigLIP processors; we use the PIL ones"),
    (r"Setting accelerator to CPU\. If you have GPU",
     "DeepSpeed on a CPU worker (ray.use_gpu=false)"),
    (r"^DeepSpeed deepspeed\.ops\.\S+ built successfully$",
     "a print() each time DeepSpeed loads its (cached) CPU comm op"),
    (r"has constructor arguments in the object store and max_restarts > 0",
     "Ray Train's own PreemptionWatcher actor (ray-project/ray#53727)"),
    (r"^Requesting resources: |^Attempting to start training worker group",
     "Ray Train controller INFO before 'Started training worker group'"),
    (r"^Checkpoint successfully created at: ",
     "every rank, every checkpoint; the closing summary names the last one"),
    (r"Creating initial MLflow database tables|^Updating database tables$",
     "MLflow creating a new sqlite store"),
    (r"^A run snapshot was found in storage folder at: |^This snapshot contains a list of checkpoints reported via"
     r"|^If you meant to start a brand new training job without any information about previous checkpoints",
     "Ray Train resuming a run name; ours prints 'resumed at step N' (a new run: tracking.run_name)"),
    (r"PYTHON worker processes have been started on node: .* maximum expected startup concurrency",
     "raylet, when a sweep starts its Tune and Train actors at once on a small machine"),
]
_NOISE = re.compile("|".join(f"(?:{pattern})" for pattern, _ in KNOWN_NOISE))
# A FutureWarning torch raises for the collective DeepSpeed calls in ZeRO (not our code).
_DEPRECATED_COLLECTIVE = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
_DYNAMO_LRU_CACHE = r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function"


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not _NOISE.search(record.getMessage())
        except Exception:  # a record whose message cannot be formatted: not ours to judge
            return True


def is_noise(line: str) -> bool:
    return not line.strip() or bool(_NOISE.search(line))  # blank: a worker's stray carriage return


def quiet_known_noise() -> None:
    """Install the filters in this process (idempotent)."""
    for name in ("transformers.utils.import_utils", "DeepSpeed", "mlflow.store.db.utils", "alembic.runtime.migration"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())
    warnings.filterwarnings("ignore", message=_DEPRECATED_COLLECTIVE, category=FutureWarning)
    # torch.compile (perf.compile_prefix) tracing diffusers' `is_torch_version` (an lru_cache) in every up/downsampler
    warnings.filterwarnings("ignore", message=_DYNAMO_LRU_CACHE, category=UserWarning)
    # MLflow draws a bar per artifact download (the model logged after training downloads a few
    # small files); MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings them back.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def filter_ray_worker_logs() -> None:
    """Wrap the driver's printer of the lines Ray streams from workers and actors so the known
    noise is dropped. Uses Ray's internal dispatcher; a Ray without it keeps printing everything."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    handlers = getattr(dispatcher, "handlers", None)
    if not handlers:
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, handler if name != "ray_print_logs" or getattr(handler, "_alignprop", False)
                                else _filtered(handler)) for name, handler in handlers]
    # The raylet's warnings reach the driver through another thread that calls the module's printer.
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not getattr(printer, "_alignprop", False):
        ray_worker.print_to_stdstream = _filtered_printer(printer)


def _filtered_printer(printer):
    def print_lines(data, ignore_prefix: bool):
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix)

    print_lines._alignprop = True
    return print_lines


def _filtered(handler):
    def print_lines(data):
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines:
            handler({**data, "lines": lines})

    print_lines._alignprop = True
    return print_lines


def close_progress_bars() -> None:
    """Close the bars the driver draws for workers (Ray's tqdm) before the closing summary: a bar
    left open (a worker that died mid-run) would otherwise be redrawn at interpreter exit."""
    try:
        from ray.experimental import tqdm_ray
    except ImportError:
        return
    manager = getattr(tqdm_ray, "_manager", None)
    if manager is None:
        return
    with manager.lock:
        for group in list(manager.bar_groups.values()):
            for bar in list(group.bars_by_uuid.values()):
                bar.close()
            group.bars_by_uuid.clear()
        manager.bar_groups.clear()


@contextmanager
def loading_bars_off():
    """diffusers' and transformers' per-call bars ("Loading pipeline components", "Loading weights",
    "Writing model shards") off for the block: they flash by for a local pipeline and say nothing.
    Hub downloads keep huggingface_hub's own bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in before:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in before:
            if enabled:
                module.enable_progress_bar()


def load_lora_weights(pipe, directory: str, weight_name: str, **kwargs) -> None:
    """`pipe.load_lora_weights` without diffusers' "no LoRA keys for <text encoder>" warning, which
    every adapter trained on the denoiser alone triggers (once per text encoder of SDXL and SD3)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(directory, weight_name=weight_name, **kwargs)
    finally:
        diffusers_logging.set_verbosity(verbosity)
