"""`ray.storage_path` as a run meets it: enough room before Ray starts, a checkpoint refused in one line
when the disk cannot hold it, and a resume from the newest whole checkpoint when the latest is broken.

    check_free_space(cfg, storage)                # driver, before Ray: room for keep_checkpoints + 1 of them
    with resume_directory(ray.train.get_checkpoint(), rank) as resume_dir:   # worker: a whole checkpoint
        ...
    report_checkpoint(metrics, directory, storage)   # worker: room first; ENOSPC → StorageFullError

A disk that fills while Ray copies a checkpoint leaves truncated files in a directory that looks
complete (trainers/checkpoint_integrity.py catches it); the previous checkpoints stay as they were.
"""

from __future__ import annotations

import errno
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ...trainers.checkpoint_integrity import newest_valid, verify_checkpoint
from ..config import RunConfig
from ..errors import StorageFullError, require
from ..models import lora_parameter_count

SLACK = 1.25  # headroom on an estimate: metadata, JSON files, a filesystem's block rounding
MB = 2**20


def checkpoint_bytes_estimate(cfg: RunConfig) -> Optional[int]:
    """Bytes of one checkpoint: per LoRA parameter the fp32 master weight and two AdamW moments
    (optimizer.safetensors), the adapter itself and, with EMA, its average; None when the denoiser's
    config is not on this machine (a hub id not in the cache)."""
    count = lora_parameter_count(cfg.model, cfg.lora)
    if count is None:
        return None
    per_parameter = 4 * (3 + 1 + (1 if cfg.trainer.ema_decay > 0 else 0))
    return int(count * per_parameter * SLACK) + MB  # + the JSON files and RNG states


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(cfg: RunConfig, storage: str) -> None:
    """Before Ray starts: a local storage path must hold `trainer.keep_checkpoints` + 1 checkpoints
    (Ray writes the next one before it deletes the oldest). Remote storage is not checked."""
    if "://" in storage:
        return
    one = checkpoint_bytes_estimate(cfg)
    if one is None:
        return
    need, free = one * (cfg.trainer.keep_checkpoints + 1), _free_bytes(Path(storage))
    require(free >= need, "ray.storage_path",
            f"{storage} has {free / MB:.1f} MB free; {cfg.trainer.keep_checkpoints + 1} checkpoints of this run need "
            f"about {need / MB:.1f} MB; accepted: a path with that much room (or fewer trainer.keep_checkpoints)")


def report_checkpoint(report, metrics: dict, directory: str, storage: Optional[str]) -> None:
    """`report(metrics, directory)` (Ray copies the checkpoint into storage), after checking that a local
    storage path has room for it; a disk that fills during the copy is the same one-line error."""
    size = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    step = metrics.get("step")
    if storage and "://" not in storage:
        free = _free_bytes(Path(storage))
        if free < size * SLACK:
            raise StorageFullError(f"ray.storage_path: {storage} has {free / MB:.1f} MB free; the checkpoint of step "
                                   f"{step} needs {size * SLACK / MB:.1f} MB; the last complete checkpoint is kept: "
                                   "free space and rerun the same command to resume")
    try:
        report(metrics, directory)
    except OSError as err:  # Ray copies with pyarrow, whose errors (like shutil's) may carry ENOSPC in the text only
        if err.errno != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        raise StorageFullError(f"ray.storage_path: {storage} ran out of space writing the checkpoint of step {step} "
                               f"({size / MB:.1f} MB); the last complete checkpoint is kept: free space and rerun the "
                               "same command to resume") from None


@contextmanager
def resume_directory(checkpoint, rank: int):
    """The directory to resume from: the newest whole checkpoint of the run in local storage (one line
    names each broken one newer than it), which may be newer than Ray's latest: a run interrupted after
    a checkpoint was written but before Ray recorded it. Remote storage: Ray's latest if whole. None to
    start afresh."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as given:
        local = Path(checkpoint.path)
        if not local.is_dir():  # remote storage: its siblings are not here to choose from
            problem = verify_checkpoint(given)
            if problem is not None:
                raise StorageFullError(f"checkpoint {checkpoint.path} is incomplete ({problem}); accepted: remove it "
                                       "from ray.storage_path and rerun, to resume from the checkpoint before it")
            yield given
            return
        chosen, broken = newest_valid(local)
        if rank == 0:
            for path, why in broken:
                print(f"[alignprop] checkpoint {path} is incomplete ({why}): skipped", file=sys.__stdout__, flush=True)
            if broken or chosen != local:
                print(f"[alignprop] resuming from {chosen}" if chosen else "[alignprop] no whole checkpoint left: "
                      "starting from step 0", file=sys.__stdout__, flush=True)
        yield str(chosen) if chosen else None
