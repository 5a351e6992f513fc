"""Checks of what a config names on this machine, once on the driver before Ray starts: prompt files,
the model directory and its family, LoRA targets against the denoiser (built on the meta device),
reward weight files, a writable storage path. Each failure is a one-line `ConfigError`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ...rewards import check_reward_files
from ..errors import ConfigError
from ..errors import require as _check
from ..models import TOY_WORLD_MODEL, denoiser_module_names, model_path, pretrained_family, resolve_family
from ..prompt_files import read_prompt_file
from .schema import RunConfig


def check_paths(cfg: RunConfig) -> None:
    """Checks of what the config names on this machine, done once on the driver before Ray starts:
    prompt files (public sets are fetched now), local model directory, LoRA target modules, reward
    weights, storage path. A prompt file relative to the cwd is made absolute (workers run
    elsewhere); shipped and public set names stay names (the run hash does not depend on paths)."""
    tr = cfg.trainer
    for key in ("prompt_file", "eval_prompt_file", "val_prompt_file"):
        name = getattr(tr, key)
        if name:
            read_prompt_file(name, f"trainer.{key}")
            if not Path(name).expanduser().is_absolute() and Path(name).expanduser().exists():
                setattr(tr, key, str(Path(name).expanduser().resolve()))
    if cfg.model.pretrained:
        _check_pretrained(cfg.model.pretrained)
    _check_family(cfg)
    check_reward_files(cfg.rewards, "rewards")
    check_reward_files(cfg.eval_rewards, "eval_rewards")
    _check_target_modules(cfg)
    storage = cfg.ray.storage_path
    if not (storage and "://" in storage):
        _check_writable(Path(storage or "~/ray_results").expanduser().resolve(), "ray.storage_path")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check_pretrained(name: str) -> None:
    name = model_path(name)
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1
    if path.exists() or looks_local:
        _check(path.is_dir(), "model.pretrained",
               f"no such directory {name!r}; accepted: a diffusers pipeline directory or a hub id such as "
               "stable-diffusion-v1-5/stable-diffusion-v1-5")
        denoiser_config = any((path / sub / "config.json").is_file() for sub in ("unet", "transformer"))
        _check((path / "model_index.json").is_file() and denoiser_config,
               "model.pretrained", f"{name!r} is not a diffusers pipeline directory (no model_index.json and unet/ "
                                   "or transformer/config.json); "
               "accepted: a directory written by save_pretrained, e.g. alignprop tiny-model DIR")
    else:
        _check(bool(_HUB_ID.fullmatch(name)), "model.pretrained",
               f"got {name!r}; accepted: a local pipeline directory, a hub id <org>/<name>, or {TOY_WORLD_MODEL}")


def _check_family(cfg: RunConfig) -> None:
    """model.family against the pipeline's own (when its model_index.json is readable here), and
    what the family rules out: sd3's Euler sampler has no eta, t5=false needs sd3."""
    m = cfg.model
    found = pretrained_family(m.pretrained, m.revision) if m.pretrained else None
    _check(m.family in ("auto", found) or found is None, "model.family",
           f"got {m.family!r} but {m.pretrained!r} is a {found} pipeline; accepted: auto or {found}")
    family = resolve_family(m)
    _check(m.t5 or family in ("sd3", None), "model.t5",
           f"false applies to sd3 pipelines only (this one is {family}); accepted: true")
    _check(family != "sd3" or cfg.trainer.algorithm != "ddpo", "trainer.algorithm",
           "ddpo needs a stochastic DDIM sampler, and sd3's flow-matching Euler sampler is deterministic; accepted "
           "for sd3: alignprop, grpo (Flow-GRPO's SDE sampler, grpo.sde_noise), refl, draft_lv, drtune, direct_align")
    _check(family != "sd3" or cfg.sampling.eta == 0, "sampling.eta",
           f"got {cfg.sampling.eta} for an sd3 pipeline, whose flow-matching Euler sampler is deterministic; "
           "accepted: 0 (grpo's sampler noise on sd3 is grpo.sde_noise)")
    _check(cfg.trainer.algorithm != "grpo" or family in ("sd3", None) or cfg.sampling.eta > 0, "sampling.eta",
           f"got 0 with trainer.algorithm=grpo on an {family} pipeline; accepted: 0 < eta <= 1 (grpo's policy there "
           "is the stochastic DDIM step, as DanceGRPO)")
    _check(family != "sd3" or not cfg.trainer.eval_eta, "trainer.eval_eta",
           f"got {cfg.trainer.eval_eta} for an sd3 pipeline (deterministic Euler); accepted: 0 or null")


def _check_target_modules(cfg: RunConfig) -> None:
    family = resolve_family(cfg.model)
    found = denoiser_module_names(family, cfg.model.tiny, cfg.model.pretrained, cfg.model.revision,
                                  cfg.model.arch) if family else None
    if found is None:  # a hub id that is not in the local cache: the worker checks it
        return
    names, linear = found
    what = "transformer" if family == "sd3" else "UNet"
    for target in cfg.lora.target_modules:  # peft's rule for a list: the name or a dotted suffix of it
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise ConfigError(f"lora.target_modules: {target!r} matches no module of the {what}; accepted: names of "
                              f"its layers such as {', '.join(linear)}")


def _check_writable(path: Path, field_name: str) -> None:
    """`path` (which may not exist yet) can be created and written by this user; leaves nothing behind."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    _check(probe.is_dir(), field_name,
           f"{str(probe)!r} is not a directory; accepted: a writable directory or s3://, gs:// URI")
    _check(os.access(probe, os.W_OK | os.X_OK) and _can_create_in(probe), field_name,
           f"{str(probe)!r} is not writable by this user; accepted: a writable directory or s3://, gs:// URI")


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be made there: root passes `os.access` everywhere, /proc and read-only mounts
    included, so a probe file is created and removed at once (the one thing written, and never left)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".alignprop-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True
