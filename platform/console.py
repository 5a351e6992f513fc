"""The console: rank 0's progress bar, and the stack's known noise filtered where it is raised
(everything else still shows).

`progress_bar(total, initial, enabled, lines)` is rank 0's bar: Ray's tqdm inside a Ray worker (the
driver draws it as one bar), plain tqdm elsewhere, one line per tenth of the run where the driver's
console is no terminal (logs, `ray job submit`).

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
import sys
import time
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
    (r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
     "Ray Train's PlacementGroupCleaner, each time Tune stops a trial (ASHA) or a run ends"),
]
# Lines that open a traceback Ray logs beside them; the traceback goes too. The Train controller's
# resource request timing out on a busy CPU: Ray's own text says "it's safe to ignore this error".
TRACEBACK_NOISE = re.compile(r"Failed to send resource request for .*safe to ignore this error")
_TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s|During handling of the above exception|"
                             r"The above exception was the direct cause|[\w.]+(Error|Exception)\b)")
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


class NoiseFilter:
    """Drops the known noise from the lines one process streams, batch after batch: a line of
    TRACEBACK_NOISE and the traceback after it (which may continue in the next batch) included."""

    def __init__(self):
        self.in_traceback: dict[object, bool] = {}  # per streaming process (pid)

    def __call__(self, lines: list[str], source: object = None) -> list[str]:
        kept, skipping = [], self.in_traceback.get(source, False)
        for line in lines:
            if TRACEBACK_NOISE.search(line):
                skipping = True
            elif not (skipping and (_TRACEBACK_LINE.match(line) or not line.strip())):
                skipping = False
                if not is_noise(line):
                    kept.append(line)
        self.in_traceback[source] = skipping
        return kept


def _filtered_printer(printer):
    drop_noise = NoiseFilter()

    def print_lines(data, ignore_prefix: bool):
        lines = drop_noise(data.get("lines", []), data.get("pid"))
        if lines:
            printer({**data, "lines": lines}, ignore_prefix)

    print_lines._alignprop = True
    return print_lines


def _filtered(handler):
    drop_noise = NoiseFilter()

    def print_lines(data):
        lines = drop_noise(data.get("lines", []), data.get("pid"))
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


class ProgressLines:
    """A bar for consoles that are no terminal: one line every tenth of the run and at the end."""

    def __init__(self, total: int, initial: int):
        self.total, self.n, self.desc, self.start, self.first = total, initial, "alignprop", time.monotonic(), initial
        self.every = max(1, total // 10)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n >= self.total:
            per_step = (time.monotonic() - self.start) / max(1, self.n - self.first)
            # sys.__stdout__: Ray Train's print patch tees a print to a wrapped sys.stdout and logs it
            # to the console as well (every line twice on the driver); this file it prints once.
            print(f"[{self.desc}] step {self.n}/{self.total} ({per_step:.2f} s/step)", file=sys.__stdout__, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, lines: bool = False):
    """Rank 0's bar. In a Ray worker, Ray's tqdm: the driver draws it as one bar (plain tqdm's
    carriage-return updates arrive there as a new line each); `lines` where no terminal shows it."""
    from tqdm.auto import tqdm

    ray = sys.modules.get("ray")  # imported by Ray's workers; never imported here (GPU checks run without Ray)
    if not enabled:
        return tqdm(total=total, disable=True)
    if lines:
        return ProgressLines(total, initial)
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        class Bar(ray_tqdm):
            def close(self):  # once: a second close (from __del__) would draw a new bar on the driver
                if not self._closed:
                    super().close()

        bar = Bar(total=total, desc="alignprop")
        bar.update(initial)
        return bar
    return tqdm(total=total, initial=initial, desc="alignprop")
