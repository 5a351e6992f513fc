"""Sweep space files (tune_spaces/*.yaml): Ludwig-style, keyed by dotted config paths.

    metric: eval/reward_total          # any metric the recipe reports (rank 0)
    mode: max                          # max | min
    scheduler: asha                    # asha (default) | none;  grace_period, reduction_factor
    search: random                     # random (default) | optuna;  seed
    space:
      optim.lr: {space: loguniform, lower: 1.0e-4, upper: 1.0e-1}
      truncation.k: {space: randint, lower: 1, upper: 11}          # upper exclusive, as in Ray
      truncation.strategy: {space: choice, categories: [fixed, uniform]}
      rewards.aesthetic.weight: {space: uniform, lower: 0.0, upper: 1.0}
      sampling.guidance_scale: {space: grid_search, values: [5.0, 7.5]}

Everything is checked against the base config before Ray starts: unknown paths, bad bounds,
unknown space types, and values that would make the run config invalid (e.g. K > N).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignprop.platform.config import ConfigError, RunConfig, flatten, from_dict, to_dict, validate

SPACE_DIR = Path(__file__).resolve().parent.parent / "tune_spaces"
SPACE_TYPES = {
    "uniform": ("lower", "upper"), "loguniform": ("lower", "upper"), "randint": ("lower", "upper"),
    "quniform": ("lower", "upper", "q"), "choice": ("categories",), "grid_search": ("values",),
}
TOP_KEYS = ("metric", "mode", "scheduler", "search", "space", "grace_period", "reduction_factor", "seed")


@dataclass
class SweepSpec:
    name: str
    space: dict[str, dict[str, Any]]
    metric: str = "eval/reward_total"
    mode: str = "max"
    scheduler: str = "asha"
    search: str = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0

    def num_trials(self, num_samples: int) -> int:
        """Ray Tune runs num_samples × (product of the grid sizes) trials."""
        grid = [len(d["values"]) for d in self.space.values() if d["space"] == "grid_search"]
        return num_samples * math.prod(grid)


def list_spaces() -> list[str]:
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def space_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = SPACE_DIR / f"{path.stem}.yaml"
    if shipped.is_file() and (path.suffix == "" or path.parent.name == "tune_spaces"):
        return shipped
    raise ConfigError(f"--space: no such file or shipped space {name_or_path!r}; accepted: a YAML path or one of {', '.join(list_spaces())}")


def load_space(name_or_path: str, cfg: RunConfig) -> SweepSpec:
    """Parse and validate a space file against the base config; one-line ConfigError on any problem."""
    path = space_path(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path.name}: unknown key {key!r}; accepted: {', '.join(TOP_KEYS)}")
    spec = SweepSpec(name=path.stem, **{k: v for k, v in data.items()})
    _check(spec.mode in ("max", "min"), "mode", f"got {spec.mode!r}; accepted: max, min")
    _check(spec.scheduler in ("asha", "none"), "scheduler", f"got {spec.scheduler!r}; accepted: asha, none")
    _check(spec.search in ("random", "optuna"), "search", f"got {spec.search!r}; accepted: random, optuna")
    _check(isinstance(spec.grace_period, int) and spec.grace_period >= 1, "grace_period", f"got {spec.grace_period!r}; accepted: an integer >= 1")
    _check(isinstance(spec.reduction_factor, int) and spec.reduction_factor >= 2, "reduction_factor", f"got {spec.reduction_factor!r}; accepted: an integer >= 2")
    _check(spec.metric in _known_metrics(cfg) or spec.metric.startswith(("eval/", "eval_ema/", "reward/")), "metric",
           f"got {spec.metric!r}; accepted: {', '.join(_known_metrics(cfg))}")
    _check(isinstance(spec.space, dict) and spec.space, "space", "empty; accepted: a mapping of config paths to {space: ...}")
    paths = flatten(to_dict(cfg))
    for spec_list in ("rewards", "eval_rewards"):  # rewards.<label>.<option>, even if not set yet
        for reward in getattr(cfg, spec_list):
            paths.setdefault(f"{spec_list}.{reward.get('label', reward['name'])}.weight", 1.0)
    for key, domain in spec.space.items():
        _validate_domain(key, domain, paths)
        _validate_values(key, domain, cfg)
    if spec.search == "optuna" and any(d["space"] == "grid_search" for d in spec.space.values()):
        raise ConfigError("search: optuna cannot sample grid_search spaces; accepted: random with grid_search, or choice with optuna")
    return spec


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _known_metrics(cfg: RunConfig) -> list[str]:
    labels = [s.get("label", s["name"]) for s in [*cfg.rewards, *cfg.eval_rewards]]
    return ["eval/reward_total", *[f"eval/{x}" for x in labels], "reward/total_mean", "loss"]


def _validate_domain(key: str, domain: Any, paths: dict[str, Any]) -> None:
    where = f"space.{key}"
    _check(key in paths, where, f"unknown config path; accepted: a key of the config such as {', '.join(p for p in paths if p.startswith(('optim.', 'truncation.')))}, rewards.<name>.weight")
    _check(isinstance(domain, dict) and domain.get("space") in SPACE_TYPES, where,
           f"got {domain!r}; accepted: {{space: {'|'.join(SPACE_TYPES)}, ...}}")
    kind, needed = domain["space"], SPACE_TYPES[domain["space"]]
    extra = set(domain) - {"space", *needed}
    _check(not extra and all(k in domain for k in needed), where, f"{kind} takes exactly {', '.join(needed)}")
    if "lower" in needed:
        lower, upper = domain["lower"], domain["upper"]
        _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lower, upper)), where, "lower and upper must be numbers")
        _check(lower < upper, where, f"lower ({lower}) must be < upper ({upper})")
        _check(kind != "loguniform" or lower > 0, where, f"loguniform needs lower > 0, got {lower}")
        _check(kind != "randint" or all(isinstance(v, int) for v in (lower, upper)), where, "randint bounds must be integers (upper exclusive)")
    else:
        values = domain[needed[0]]
        _check(isinstance(values, list) and len(values) > 0, where, f"{needed[0]} must be a non-empty list")


def _extremes(domain: dict) -> list[Any]:
    kind = domain["space"]
    if kind == "randint":
        return [domain["lower"], domain["upper"] - 1]
    if kind in ("uniform", "loguniform", "quniform"):
        return [domain["lower"], domain["upper"]]
    return list(domain["categories" if kind == "choice" else "values"])


def _validate_values(key: str, domain: dict, cfg: RunConfig) -> None:
    """Each extreme value on its own must give a valid run config (catches K > N before Ray)."""
    for value in _extremes(domain):
        try:
            apply_params(cfg, {key: value})
        except ConfigError as err:
            raise ConfigError(f"space.{key}: value {value!r} makes the config invalid ({err})") from None


def apply_params(cfg: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted-path values set; `rewards.<label>.<option>` edits that reward."""
    data = copy.deepcopy(to_dict(cfg))
    for key, value in params.items():
        section, rest = key.split(".", 1)
        if section in ("rewards", "eval_rewards"):
            label, option = rest.rsplit(".", 1)
            entry = next(s for s in data[section] if s.get("label", s["name"]) == label)
            entry[option] = value
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    out = from_dict(data)
    validate(out)
    return out


def tune_domain(domain: dict):
    """A space entry → the Ray Tune sampler."""
    from ray import tune

    kind = domain["space"]
    if kind == "uniform":
        return tune.uniform(domain["lower"], domain["upper"])
    if kind == "loguniform":
        return tune.loguniform(domain["lower"], domain["upper"])
    if kind == "quniform":
        return tune.quniform(domain["lower"], domain["upper"], domain["q"])
    if kind == "randint":
        return tune.randint(domain["lower"], domain["upper"])
    if kind == "choice":
        return tune.choice(domain["categories"])
    return tune.grid_search(domain["values"])
