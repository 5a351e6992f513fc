"""Sweep space files (tune_spaces/*.yaml): Ludwig-style, keyed by dotted config paths.

    metric: eval/reward_total          # any metric the recipe reports (rank 0); default trainer.best_metric
    mode: max                          # max | min
    scheduler: asha                    # asha (default) | none;  grace_period, reduction_factor
    search: random                     # random (default) | optuna;  seed
    space:
      optim.lr: {space: loguniform, lower: 1.0e-4, upper: 1.0e-1}
      truncation.k: {space: randint, lower: 1, upper: 11}          # upper exclusive, as in Ray
      truncation.strategy: {space: choice, categories: [fixed, uniform]}
      rewards.aesthetic.weight: {space: uniform, lower: 0.0, upper: 1.0}
      sampling.guidance_scale: {space: grid_search, values: [5.0, 7.5]}

Everything is checked against the base config before Ray starts: YAML syntax, unknown paths,
bad or non-finite bounds, unknown space types, a distribution that cannot fit the field's type
(e.g. `uniform` on the integer `truncation.k`), and values that would make the run config invalid,
alone or together (every combination of the dimensions' extremes, e.g. K > N when both vary).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, RunConfig, flatten, from_dict, to_dict, validate
from ..yaml_files import load_bounded

SPACE_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"
SPACE_TYPES = {
    "uniform": ("lower", "upper"), "loguniform": ("lower", "upper"), "randint": ("lower", "upper"),
    "quniform": ("lower", "upper", "q"), "choice": ("categories",), "grid_search": ("values",),
}
TOP_KEYS = ("metric", "mode", "scheduler", "search", "space", "grace_period", "reduction_factor", "seed")
FILE_ACCEPTED = ("a YAML mapping with a space: section of config paths to {space: ...} "
                 f"(and optionally {', '.join(k for k in TOP_KEYS if k != 'space')})")
SPACE_ACCEPTED = f"a mapping of config paths to {{space: {'|'.join(SPACE_TYPES)}, ...}}"
# Every combination of the dimensions' extremes is validated up to this many (each costs one full
# config validation, ~50 ms); beyond it, each dimension alone and every pair of dimensions.
MAX_COMBINATIONS = 256


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
    raise ConfigError(f"--space: no such file or shipped space {name_or_path!r}; accepted: a YAML path or one of "
                      f"{', '.join(list_spaces())}")


def load_space(name_or_path: str, cfg: RunConfig) -> SweepSpec:
    """Parse and validate a space file against the base config; one-line ConfigError on any problem."""
    path = space_path(name_or_path)
    data = _read_yaml(path)
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path.name}: unknown key {key!r}; accepted: {', '.join(TOP_KEYS)}")
    if "space" not in data or not isinstance(data["space"], dict):
        got = f"got {_describe(data['space'])}" if "space" in data else "missing"
        raise ConfigError(f"space: {got} in {path.name}; accepted: {SPACE_ACCEPTED}")
    spec = SweepSpec(name=path.stem, **{"metric": cfg.trainer.best_metric, **data})  # default: the run's best_metric
    _check(spec.mode in ("max", "min"), "mode", f"got {_short(spec.mode)}; accepted: max, min")
    _check(spec.scheduler in ("asha", "none"), "scheduler", f"got {_short(spec.scheduler)}; accepted: asha, none")
    _check(spec.search in ("random", "optuna"), "search", f"got {_short(spec.search)}; accepted: random, optuna")
    _check(_is_int(spec.grace_period) and spec.grace_period >= 1, "grace_period",
           f"got {_short(spec.grace_period)}; accepted: an integer >= 1")
    _check(_is_int(spec.reduction_factor) and spec.reduction_factor >= 2, "reduction_factor",
           f"got {_short(spec.reduction_factor)}; accepted: an integer >= 2")
    _check(_is_int(spec.seed), "seed", f"got {_short(spec.seed)}; accepted: an integer")
    known = isinstance(spec.metric, str) and (spec.metric in _known_metrics(cfg)
                                              or spec.metric.startswith(("eval/", "eval_ema/", "reward/")))
    _check(known,
           "metric", f"got {_short(spec.metric)}; accepted: {', '.join(_known_metrics(cfg))}")
    _check(bool(spec.space), "space", f"empty in {path.name}; accepted: {SPACE_ACCEPTED}")
    paths = flatten(to_dict(cfg))
    for spec_list in ("rewards", "eval_rewards"):  # rewards.<label>.<option>, even if not set yet
        for reward in getattr(cfg, spec_list):
            paths.setdefault(f"{spec_list}.{reward.get('label', reward['name'])}.weight", 1.0)
    for key, domain in spec.space.items():
        _validate_domain(key, domain, paths, path.name)
        _validate_type(key, domain, paths)
    if spec.search == "optuna" and any(d["space"] == "grid_search" for d in spec.space.values()):
        raise ConfigError("search: optuna cannot sample grid_search spaces; accepted: random with grid_search, or "
                          "choice with optuna")
    _validate_combinations(spec.space, cfg)
    return spec


def _read_yaml(path: Path) -> dict:
    """The file's top-level mapping, or a one-line ConfigError naming the file (never a traceback)."""
    try:
        data = load_bounded(path.read_text(), path.name)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{path.name}: not valid YAML ({where}{problem}); accepted: {FILE_ACCEPTED}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path.name}: cannot read it as text ({type(err).__name__}); "
                          f"accepted: {FILE_ACCEPTED}") from None
    if data is None:
        raise ConfigError(f"{path.name}: empty file; accepted: {FILE_ACCEPTED}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: got {_describe(data)} at the top level; accepted: {FILE_ACCEPTED}")
    return data


def _describe(value: Any) -> str:
    """A short name of what a YAML value is (for 'got ...')."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{_short(value)} ({type(value).__name__})"


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _known_metrics(cfg: RunConfig) -> list[str]:
    labels = [s.get("label", s["name"]) for s in [*cfg.rewards, *cfg.eval_rewards]]
    return ["eval/reward_total", *[f"eval/{x}" for x in labels], "reward/total_mean", "loss"]


def _validate_domain(key: Any, domain: Any, paths: dict[str, Any], file: str = "the space file") -> None:
    where = f"space.{key}"
    _check(key in paths, where, "unknown config path; accepted: a key of the config such as "
           f"{', '.join(p for p in paths if p.startswith(('optim.', 'truncation.')))}, rewards.<name>.weight")
    _check(isinstance(domain, dict) and isinstance(domain.get("space"), str) and domain["space"] in SPACE_TYPES, where,
           f"got {_short(domain)} in {file}; accepted: a mapping {{space: {'|'.join(SPACE_TYPES)}, ...}}")
    kind, needed = domain["space"], SPACE_TYPES[domain["space"]]
    extra = set(domain) - {"space", *needed}
    _check(not extra and all(k in domain for k in needed), where,
           f"{kind} takes exactly {', '.join(needed)}; accepted: "
           f"{{space: {kind}, {', '.join(f'{k}: ...' for k in needed)}}}")
    if "lower" in needed:
        for name in needed:  # YAML reads 1e-4 (no dot) as a string: take it as the number it spells
            if _numeric_text(domain[name]):
                domain[name] = float(domain[name])
        lower, upper = domain["lower"], domain["upper"]
        _check(all(_is_number(v) for v in (lower, upper)), where,
               f"lower and upper must be numbers, got {_short(lower)} and {_short(upper)}; accepted: finite numbers "
               "with lower < upper")
        _check(all(math.isfinite(v) for v in (lower, upper)), where,
               f"got lower={lower}, upper={upper}; accepted: finite numbers with lower < upper")
        _check(lower < upper, where,
               f"lower ({lower}) must be < upper ({upper}); accepted: finite numbers with lower < upper")
        _check(kind != "loguniform" or lower > 0, where,
               f"loguniform needs lower > 0, got {lower}; accepted: 0 < lower < upper")
        _check(kind != "randint" or all(_is_int(v) for v in (lower, upper)), where,
               f"randint bounds must be integers (upper exclusive), got {lower} and {upper}; accepted: integers with "
               "lower < upper")
        if kind == "quniform":
            q = domain["q"]
            _check(_is_number(q) and math.isfinite(q) and 0 < q <= upper - lower, where,
                   f"got q={_short(q)}; accepted: a finite number with 0 < q <= upper - lower ({upper - lower:g})")
    else:
        name = needed[0]
        values = domain[name]
        _check(isinstance(values, list) and len(values) > 0, where,
               f"{name} must be a non-empty list; accepted: {{space: {kind}, {name}: [...]}}")
        for value in values:
            _check(_finite(value), where, f"{name} holds {_short(value)}; accepted: finite values (no .inf or .nan)")


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


# What a field of each type accepts in a space file.
_FLOAT_SPACES = ("uniform", "loguniform", "quniform")
_TYPE_ACCEPTS = {
    "int": ("an integer", "randint, or choice/grid_search of integers"),
    "float": ("a number", "uniform, loguniform, quniform, randint, or choice/grid_search of numbers"),
    "bool": ("true/false", "choice/grid_search of true, false"),
    "str": ("a string", "choice/grid_search of strings"),
    "list": ("a list", "choice/grid_search of lists"),
    "dict": ("a mapping", "choice/grid_search of mappings"),
}


def _field_type(key: str, base: Any) -> tuple[Optional[str], bool]:
    """(int|float|bool|str|list|dict or None for anything, whether null is allowed) of a config path:
    from the RunConfig schema, else (reward options, untyped fields) from the base config's value."""
    node: Any = RunConfig
    for part in key.split("."):
        if dataclasses.is_dataclass(node):
            hints = typing.get_type_hints(node)
            node = hints.get(part, Any)
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1] if typing.get_args(node) else Any
        else:
            node = Any
            break
    optional = False
    if typing.get_origin(node) is typing.Union:
        args = [a for a in typing.get_args(node) if a is not type(None)]
        optional = len(args) < len(typing.get_args(node))
        node = args[0] if len(args) == 1 else Any
    origin = typing.get_origin(node) or node
    names = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}
    if origin in names:
        return names[origin], optional
    # Untyped (e.g. rewards.<label>.<option>): lenient, from the base value; numbers take any number.
    if isinstance(base, bool):
        return "bool", False
    if _is_number(base):
        return "float", False
    if isinstance(base, (str, list, dict)):
        return names[type(base)], False
    return None, True


def _fits(value: Any, ftype: str, optional: bool) -> bool:
    if value is None:
        return optional
    return {
        "int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str), "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
    }[ftype](value)


def _numeric_text(value: Any) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _validate_type(key: str, domain: dict, paths: dict[str, Any]) -> None:
    """The distribution (or every category) fits the config field's type: no floats into ints."""
    ftype, optional = _field_type(key, paths.get(key))
    if ftype is None:
        return
    what, accepted = _TYPE_ACCEPTS[ftype]
    accepted += ", or null" if optional else ""
    kind = domain["space"]
    where = f"space.{key}"
    if kind in ("choice", "grid_search"):
        name = SPACE_TYPES[kind][0]
        if ftype == "float":  # YAML reads 1e-5 (no dot) as a string: take it as the number it spells
            domain[name] = [float(v) if _numeric_text(v) else v for v in domain[name]]
        for value in domain[name]:
            hint = (" (YAML reads a number without a dot, like 1e-4, as a string: write 1.0e-4)"
                    if _numeric_text(value) else "")
            _check(_fits(value, ftype, optional), where,
                   f"{name} holds {_short(value)} ({type(value).__name__}) but {key} is {what}{hint}; accepted: "
                   f"{accepted}")
        return
    samples = "floats" if kind in _FLOAT_SPACES else "integers"
    _check(ftype == "float" or (ftype == "int" and kind == "randint"), where,
           f"{kind} samples {samples} but {key} is {what}; accepted: {accepted}")


def _extremes(domain: dict) -> list[Any]:
    kind = domain["space"]
    if kind == "randint":
        return [domain["lower"], domain["upper"] - 1]
    if kind in ("uniform", "loguniform"):
        return [domain["lower"], domain["upper"]]
    if kind == "quniform":  # Ray rounds to multiples of q, which may fall outside [lower, upper]
        lower, upper, q = domain["lower"], domain["upper"], domain["q"]
        return list(dict.fromkeys([lower, upper, round(lower / q) * q, round(upper / q) * q]))
    return list(domain["categories" if kind == "choice" else "values"])


def extreme_rows(space: dict[str, dict]) -> list[dict[str, Any]]:
    """Combinations of the dimensions' extremes: all of them, or past MAX_COMBINATIONS full combinations
    that hold every value of each dimension and every pair of values of each pair of dimensions."""
    extremes = {key: _extremes(domain) for key, domain in space.items()}
    if math.prod(len(v) for v in extremes.values()) <= MAX_COMBINATIONS:
        return [dict(zip(extremes, values)) for values in itertools.product(*extremes.values())]
    return _pairwise_rows(extremes)


def _validate_combinations(space: dict[str, dict], cfg: RunConfig) -> None:
    """Every combination of the dimensions' extremes gives a valid run config (catches K > N when K
    and N both vary)."""
    base = to_dict(cfg)
    extremes = {key: _extremes(domain) for key, domain in space.items()}
    for row in extreme_rows(space):
        error = _config_error(base, row)
        if error is not None:
            _raise_combination(base, row, extremes, error)


def _pairwise_rows(extremes: dict[str, list]) -> list[dict[str, Any]]:
    """Greedy covering set: full combinations in which every value of every dimension and every pair
    of values of every two dimensions appears at least once (far fewer than the full product)."""
    keys = list(extremes)
    sizes = [len(extremes[k]) for k in keys]
    if len(keys) == 1:
        return [{keys[0]: v} for v in extremes[keys[0]]]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(keys)), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        chosen = {i: a, j: b}
        for k in range(len(keys)):
            if k not in chosen:
                gain = lambda v: sum(  # noqa: E731
                    ((m, chosen[m], k, v) if m < k else (k, v, m, chosen[m])) in uncovered for m in chosen)
                chosen[k] = max(range(sizes[k]), key=gain)
        uncovered -= {(m, chosen[m], n, chosen[n]) for m, n in itertools.combinations(range(len(keys)), 2)}
        rows.append({keys[k]: extremes[keys[k]][chosen[k]] for k in range(len(keys))})
    return rows


def _config_error(base: dict, params: dict[str, Any]) -> Optional[str]:
    try:
        _apply_to_dict(base, params)
    except ConfigError as err:
        return str(err)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        return " ".join(str(err).split("\n")[0].split())
    return None


def _raise_combination(base: dict, row: dict[str, Any], extremes: dict[str, list], error: str) -> None:
    """Name the dimensions that matter: those for which another extreme makes this combination valid."""
    involved = [k for k in row if len(row) == 1 or any(_config_error(base, {**row, k: v}) is None for v in extremes[k])]
    if not involved:  # each dimension fails at every extreme with the others as here: name one bad alone
        alone = [k for k in row if _config_error(base, {k: row[k]}) is not None]
        involved = alone[:1] or list(row)
        if alone:
            error = _config_error(base, {alone[0]: row[alone[0]]}) or error
    if len(involved) == 1:
        key = involved[0]
        accepted = "" if "accepted:" in error else f"; accepted: values of {key} that give a valid config"
        raise ConfigError(f"space.{key}: value {_short(row[key])} makes the config invalid ({error}){accepted}")
    names = " + ".join(f"space.{k}" for k in involved)
    combo = ", ".join(f"{k}={_short(row[k])}" for k in involved)
    raise ConfigError(f"{names}: the combination {combo} makes the config invalid ({error}); "
                      "accepted: ranges whose every combination of extremes is a valid config")


def apply_params(cfg: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted-path values set; `rewards.<label>.<option>` edits that reward."""
    return _apply_to_dict(to_dict(cfg), params)


def _apply_to_dict(base: dict[str, Any], params: dict[str, Any]) -> RunConfig:
    data = copy.deepcopy(base)
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
