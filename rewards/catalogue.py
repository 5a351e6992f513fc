"""The reward catalogue: every reward by name in one dict, and what the config layer asks of it —
validating `[{name, weight, ...options}]` specs without building anything, checking that named
weight files exist here, building the weighted combination, and `alignprop rewards list`.

    rewards = build_rewards([{"name": "brightness", "weight": 1.0}])
    validate_reward_specs(cfg.rewards, "rewards", allow_empty=False)
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..platform.errors import ConfigError
from .aesthetic import Aesthetic
from .analytic import Brightness, Colorfulness, Saturation
from .base import Reward, WeightedRewards
from .compressibility import Compressibility, JpegSize
from .object_count import ObjectCount
from .preference import HPSv2, PickScore
from .toy import (ToyBackgroundMatch, ToyColor, ToyColorMatch, ToyCount, ToyCountExact, ToyCountJudge,
                  ToyShapeMatch)

# read by the combination, not the reward
_COMBINATION_KEYS = ("name", "weight", "label", "normalize", "normalize_decay")

NORMALIZE_DECAY = 0.99


REWARDS: dict[str, type[Reward]] = {  # the one lookup of rewards by name
    "brightness": Brightness, "saturation": Saturation, "colorfulness": Colorfulness,
    "aesthetic": Aesthetic, "compressibility": Compressibility, "jpeg_size": JpegSize,
    "object_count": ObjectCount, "hpsv2": HPSv2, "pickscore": PickScore,
    "toy_count": ToyCount, "toy_color": ToyColor, "toy_count_exact": ToyCountExact, "toy_color_match": ToyColorMatch,
    "toy_count_judge": ToyCountJudge, "toy_shape_match": ToyShapeMatch, "toy_background_match": ToyBackgroundMatch,
}


def _options(cls: type[Reward]) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


def validate_reward_specs(specs: Sequence[Any], field: str, allow_empty: bool, needs_gradient: bool = True) -> None:
    """Check `[{name, weight, ...options}]` without building anything; one-line ConfigError."""
    registry = REWARDS
    if not specs and not allow_empty:
        raise ConfigError(f"{field}: empty; accepted: a list of {{name, weight, ...options}} with name in "
                          f"{', '.join(registry)}")
    labels = set()
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'name' key; accepted names: {', '.join(registry)}")
        if spec["name"] not in registry:
            raise ConfigError(f"{where}.name: unknown reward {spec['name']!r}; accepted: {', '.join(registry)}")
        if field == "rewards" and needs_gradient and not registry[spec["name"]].differentiable:
            raise ConfigError(f"{where}.name: {spec['name']!r} has no gradient; accepted in eval_rewards, or as a "
                              "training reward "
                              "with trainer.algorithm=ddpo (train on its differentiable twin otherwise, e.g. "
                              "compressibility)")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}.weight: got {weight!r}; accepted: a number")
        label = spec.get("label", spec["name"])
        if label in labels:
            raise ConfigError(f"{where}.label: {label!r} appears twice; give each repeated reward a distinct label")
        labels.add(label)
        accepted = _options(registry[spec["name"]])
        for key in spec:
            if key not in _COMBINATION_KEYS and key not in accepted:
                raise ConfigError(f"{where}.{key}: unknown option of reward {spec['name']!r}; accepted: "
                                  f"{', '.join([*_COMBINATION_KEYS[1:], *accepted])}")
        if not isinstance(spec.get("normalize", False), bool):
            raise ConfigError(f"{where}.normalize: got {spec['normalize']!r}; accepted: true, false")
        decay = spec.get("normalize_decay", NORMALIZE_DECAY)
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1):
            raise ConfigError(f"{where}.normalize_decay: got {decay!r}; accepted: a number in [0, 1) "
                              f"(EMA decay per step; 0 or null: all-history mean/std)")
        cls = registry[spec["name"]]
        for key, accepted_values in cls.choices.items():
            if key in spec and spec[key] not in accepted_values:
                raise ConfigError(f"{where}.{key}: got {spec[key]!r}; accepted: {', '.join(map(str, accepted_values))}")
        problem = cls.spec_error(spec)
        if problem is not None:
            raise ConfigError(f"{where}.{problem[0]}: {problem[1]}")


def check_reward_files(specs: Sequence[dict[str, Any]], field: str) -> None:
    """The weights each reward names exist here (on the driver: the head node of a cluster)."""
    for i, spec in enumerate(specs):
        for key in _WEIGHT_OPTIONS:
            _check_weights_location(spec.get(key), f"{field}[{i}].{key}", required_file=key in _REQUIRED_FILES)


def _check_weights_location(value: Any, where: str, required_file: bool) -> None:
    """A local weights path must exist (checked on the driver, not found missing inside a worker)."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: got {value!r}; accepted: a local path or a hub id <org>/<name>")
    path = Path(value).expanduser()
    looks_local = required_file or path.is_absolute() or value.startswith((".", "~")) or value.count("/") != 1
    if looks_local and not path.exists():
        accepted = "an existing local file" if required_file else "an existing local path or a hub id <org>/<name>"
        raise ConfigError(f"{where}: no such file or directory {value!r}; accepted: {accepted}")


def build_reward(spec: dict[str, Any], dtype: Optional[torch.dtype] = None) -> Reward:
    """The reward a spec names, frozen; a model-backed one's network in its `dtype` option, `auto`
    (the default) meaning `dtype`, the worker's compute dtype (None: float32)."""
    cls = REWARDS[spec["name"]]
    options = {k: v for k, v in spec.items() if k not in _COMBINATION_KEYS}
    reward = cls(**options).freeze()
    return reward.cast(options.get("dtype", "auto"), dtype) if "dtype" in _options(cls) else reward


def build_rewards(specs: Sequence[dict[str, Any]], dtype: Optional[torch.dtype] = None) -> WeightedRewards:
    """The weighted combination of `specs`; `dtype`: the worker's compute dtype (see `build_reward`)."""
    named = [(s.get("label", s["name"]), s.get("weight", 1.0), build_reward(s, dtype)) for s in specs]
    return WeightedRewards(named, normalize=[bool(s.get("normalize", False)) for s in specs],
                           normalize_decay=[s.get("normalize_decay", NORMALIZE_DECAY) for s in specs])

_WEIGHT_OPTIONS = ("model", "clip_model", "processor", "tokenizer", "config", "mlp_path", "checkpoint")

_REQUIRED_FILES = ("mlp_path", "checkpoint")  # weights that no hub id provides: the user must set them


def _located(value: Any) -> str:
    """'found' if a local path exists or a hub id is in the local HF cache, else 'missing'."""
    if Path(str(value)).expanduser().exists():
        return "found"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(value), "config.json")
        return "found (hub cache)" if isinstance(hit, str) else "missing"
    except Exception:  # not a valid repo id either
        return "missing"


def describe_rewards() -> list[dict[str, str]]:
    """For `alignprop rewards list`: each reward, what it loads, and whether its default weights are here."""
    rows = []
    for name, cls in REWARDS.items():
        weights = []
        for option, param in _options(cls).items():
            if option not in _WEIGHT_OPTIONS:
                continue
            default = param.default
            if default in (None, inspect.Parameter.empty):
                status = "not set (required)" if option in _REQUIRED_FILES else "built in"
            else:
                status = f"{default}: {_located(default)}"
            weights.append(f"{option}={status}")
        rows.append({"name": name, "needs": cls.needs, "weights": "; ".join(weights) or "none needed"})
    return rows
