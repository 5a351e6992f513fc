"""Loading a run configuration: schema ← YAML preset ← `key=value` overrides, then validation (validate.py)
and the checks of what it names on this machine (checks.py); plain dicts for Ray and YAML for MLflow.

    cfg = load_config("tiny-cpu", ["optim.lr=3e-4", "truncation.k=5"])
    run_name(cfg)      # tiny-cpu-<8 hex>: deterministic, so a rerun resumes

Every error is a `ConfigError` whose message is one line naming the field and what is accepted;
it is raised on the driver before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import fields
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..presets import resolve_preset
from ..yaml_files import load_bounded
from .checks import check_paths
from .schema import DirectAlignSection, DRTuneSection, GRPOSection, RunConfig, flatten, to_dict
from .validate import validate




def load_config(name_or_path: str, overrides: Sequence[str] = (), paths: bool = True) -> RunConfig:
    """Merge schema ← preset ← overrides, validate, check the paths it names (unless `paths=False`:
    a preset meant for another machine), and return a typed config."""
    preset = resolve_preset(name_or_path)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r}: expected key=value; accepted: e.g. optim.lr=3e-4 or truncation.k=5")
        if item.split("=", 1)[1].strip() == "???":
            raise ConfigError(f"{item.split('=', 1)[0].strip()}: '???' (a missing value); accepted: a value")
    try:
        load_bounded(preset.read_text(), f"--config {preset}")  # refuses alias bombs before OmegaConf walks them
        data = OmegaConf.load(preset)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {preset}: not a readable YAML file ({_first_line(err)}); accepted: a mapping of "
                          "sections such as model, optim, trainer") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"--config {preset}: expected a mapping of sections; accepted: "
                          f"{', '.join(f.name for f in fields(RunConfig))}")
    reward_edits = [item for item in overrides if _REWARD_OPTION.match(item)]
    overrides = [item for item in overrides if item not in reward_edits]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig(name=preset.stem)), data,
                                 OmegaConf.from_dotlist(list(overrides)))
        _apply_reward_edits(merged, reward_edits)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: '???' (a missing value); accepted: a value for {missing[0]}")
        cfg: RunConfig = OmegaConf.to_object(merged)
        to_dict(cfg)  # element types of lists (a prompt list nested in a list) are checked on the way back
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. rewards={name: x}: a mapping where a list belongs
        raise ConfigError(_merge_type_message(err, overrides)) from None
    validate(cfg)
    if paths:
        check_paths(cfg)
    return cfg

# rewards.<label>.<option>=value (and eval_rewards.…): one option of one listed reward, as in sweep spaces
_REWARD_OPTION = re.compile(r"(eval_rewards|rewards)\.([^.=\[\]]+)\.(\w+)=(.*)", re.S)


def _apply_reward_edits(merged: DictConfig, edits: Sequence[str]) -> None:
    for item in edits:
        section, label, option, value = _REWARD_OPTION.match(item).groups()
        entries = [e for e in merged[section] if isinstance(e, DictConfig) and e.get("label", e.get("name")) == label]
        if not entries:
            labels = [str(e.get("label", e.get("name"))) for e in merged[section] if isinstance(e, DictConfig)]
            raise ConfigError(f"{section}.{label}: no such reward in {section}; accepted: "
                              f"{', '.join(labels) or 'none listed'}")
        entries[0][option] = yaml.safe_load(value) if value.strip() else None


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _merge_type_message(err: Exception, overrides: Sequence[str]) -> str:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _LIST_FIELDS and not item.split("=", 1)[1].lstrip().startswith("["):
            return f"{key}: got {item.split('=', 1)[1]!r}; accepted: {_LIST_FIELDS[key]}"
    return f"config: {_first_line(err)}"

_LIST_FIELDS = {
    "rewards": "a list such as [{name: brightness, weight: 1.0}]",
    "eval_rewards": "a list such as [{name: saturation}]",
    "lora.target_modules": "a list such as [to_q, to_k, to_v, to_out.0]",
    "optim.betas": "a list of two numbers such as [0.9, 0.999]",
    "trainer.prompts": "a list of prompts such as [a cat, a dog]",
    "trainer.eval_prompts": "a list of prompts such as [a cat, a dog]",
    "trainer.val_prompts": "a list of prompts such as [a cat, a dog]",
    "trainer.eval_lora_scales": "a list of numbers such as [0.5, 1.0]",
}


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    first = str(err).splitlines()[0]
    if "Key '" in first and "not in" in first:
        return f"{key}: unknown key; accepted: {', '.join(_section_keys(key))}"
    bad_type = re.match(r"Value '(.*)' of type '.*' could not be converted to (\w+)", first)
    if bad_type:
        return f"{key}: got {bad_type[1]!r}; accepted: a {bad_type[2].lower()}"
    if key in _LIST_FIELDS:
        return f"{key}: not a list; accepted: {_LIST_FIELDS[key]}"
    listed = re.sub(r"\[\d+\]$", "", key)
    if listed in _LIST_FIELDS:  # an element of the wrong type (a list nested in a list)
        return f"{key}: {first}; accepted: {_LIST_FIELDS[listed]}"
    section = re.match(r"Merge error: \w+ is not a subclass of (\w+)Section", first)
    if section or "is not a subclass of" in first:
        name = key or (section[1].lower() if section else "config")
        keys = _section_keys(f"{name}.x") if name in {f.name for f in fields(RunConfig)} else []
        return f"{name}: not a mapping; accepted: a mapping of {', '.join(keys) or 'keys'}"
    if "Interpolation" in type(err).__name__ or "interpolation" in first.lower():
        return f"{key or 'config'}: cannot resolve interpolation ({first}); accepted: plain values"
    if "Incompatible value 'None'" in first:
        return f"{key}: no value given; accepted: {key}=<value>"
    return f"{key}: {first}" if key else first


def _section_keys(full_key: str) -> list[str]:
    """The keys accepted beside `full_key` (e.g. optim.bogus → lr, betas, ...)."""
    node: Any = RunConfig
    for part in full_key.split(".")[:-1]:
        node = {f.name: f for f in fields(node)}[part].default_factory
    return [f.name for f in fields(node)]

# Keys that do not change the training trajectory: a rerun that only changes these resumes.
_NOT_IN_RUN_HASH = ("trainer.max_steps", "trainer.eval_every", "trainer.ckpt_every", "trainer.keep_checkpoints", "ray.",
                    "tracking.")

# Fields added after runs existed: at these values they leave run names as they were, so those runs still resume.
_ADDED_DEFAULTS = {"model.arch": None, "sampling.activation_budget_mb": None, "perf.autocast": "none",
                   "perf.attention": "sdpa", "perf.channels_last": False, "perf.lora_prefix": "fold",
                   "perf.tf32": True, "perf.compile_prefix": False, "perf.compile_mode": "default",
                   "trainer.eval_seeds": 2, "trainer.best_metric": "eval/reward_total",
                   "trainer.eval_eta": None, "trainer.eval_num_steps": None, "trainer.val_prompts": [],
                   "trainer.val_prompt_file": None, "trainer.images_per_prompt": 1, "ddpo.updates_per_epoch": 1,
                   "optim.kl_coef": 0.0, "trainer.eval_lora_scales": [1.0],
                   **{f"grpo.{f.name}": f.default for f in fields(GRPOSection)},
                   **{f"drtune.{f.name}": f.default for f in fields(DRTuneSection)},
                   **{f"direct_align.{f.name}": f.default for f in fields(DirectAlignSection)}}


def run_name(cfg: RunConfig) -> str:
    """Deterministic: an explicit tracking.run_name, else `<name>-<8 hex of the trajectory config>`."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    shaping = {k: v for k, v in flatten(to_dict(cfg)).items()
               if not k.startswith(_NOT_IN_RUN_HASH) and (k not in _ADDED_DEFAULTS or v != _ADDED_DEFAULTS[k])}
    if shaping.get("sampling.checkpoint_unet") in ("all", "none"):  # was a bool
        shaping["sampling.checkpoint_unet"] = shaping["sampling.checkpoint_unet"] == "all"
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.name}-{digest}"
