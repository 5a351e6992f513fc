"""A sweep's own records, from which `alignprop tune` resumes: nothing in `ray.storage_path` is unpickled.

    alignprop tune --config tiny-cpu --space tiny-smoke --num-samples 4 --name smoke   # run; rerun = resume

    <storage>/<sweep>/alignprop_sweep.json       the trial plan: each trial's id and params (JSON, ours)
    <storage>/<sweep>/trials/<sweep>-<trial id>/  each trial's Ray Train run: safetensors + JSON checkpoints
    <storage>/<sweep>/tune/<session>/            each session's Ray Tune experiment: written, never read back

Why not Ray Tune's resume: `Tuner.restore` unpickles `tuner.pkl` (tune/impl/tuner_internal.py:380), the
cloudpickle blobs in `experiment_state-*.json` (`_loads_with_cloudpickle`, tune/execution/tune_controller.py:453;
every Trial's non-JSON fields, tune/experiment/trial.py:1069), the searcher state (`basic-variant-state-*.json`
and `search_gen_state-*.json` are cloudpickles despite the suffix, tune/utils/util.py:452; `searcher-state-*.pkl`)
and `callback-states-*.pkl` (tune/callback.py:488). Anyone who can write the storage path (a team bucket)
would run code on the next rerun. So every (re)run starts fresh Tune experiments and rebuilds the sweep:

- the plan: random search and grids are sampled up front (Ray's own `generate_variants`, seeded by the
  space's `seed`) and written before any trial starts; Optuna's trials are recorded as they start. On
  resume the file is read as data: the space and `--num-samples` it was made for must be the ones given,
  and every trial's params must lie in the space and make a valid config, else one line naming the file;
- which trials are done: their MLflow child runs (FINISHED, or KILLED by ASHA); done trials never rerun,
  the others continue under the same trial id, so their TorchTrainer (same run name) resumes from its
  last safetensors checkpoint and their MLflow child run continues;
- ASHA's rungs: every trial's reported metric by step, from MLflow, replayed into a fresh scheduler, so a
  resumed or new trial is compared with all trials of the sweep and no trial twice at one rung (ASHA's
  clock is the training `step`, which a resumed trial continues, not Tune's per-session iteration count).

In a session, platform/tune.py calls `tune.run`, not `Tuner.fit`: Tuner's ResultGrid unpickles an errored
trial's `error.pkl` back from storage (tune/result_grid.py:276 → tune/experiment/trial.py:774). What the
trials read back is JSON and safetensors only: Ray Train V2's `checkpoint_manager_snapshot.json` (json +
pydantic, train/v2/_internal/execution/checkpoint/checkpoint_manager.py:372) and our checkpoints, which
`check_checkpoint_files` vets (trainers/checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from types import SimpleNamespace
from typing import Any, Optional

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from ..config import RunConfig
from ..errors import ConfigError
from ..tracking import quote_filter_value
from .space import SweepSpec, apply_params, tune_domain

PLAN_FILE = "alignprop_sweep.json"
PLAN_FORMAT, PLAN_VERSION = "alignprop-sweep", 1
MAX_PLAN_BYTES = 16 << 20  # a plan of 10,000 trials is ~2 MB
TRIAL_KEY = "alignprop_trial"  # Tune's config of a planned trial: {TRIAL_KEY: <trial id>}
ACCEPTED_PLAN = "the plan alignprop wrote for this sweep, or a new --name for a new sweep"
TRIAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,31}")
# Ray Tune's state files (and any pickle) at the top of a sweep directory: listed once, never loaded.
TUNE_STATE = re.compile(r"(tuner\.pkl|experiment_state-.*\.json|basic-variant-state-.*\.json|search_gen_state-.*\.json"
                        r"|.*\.(pkl|pickle|pt|pth|bin|npy|joblib))")


# ------------------------------------------------------------------------------------- the plan
def new_plan(spec: SweepSpec, num_samples: int) -> list[dict[str, Any]]:
    """Every trial of a random or grid sweep, sampled now as Tune's BasicVariantGenerator would
    (num_samples passes over the grid, random dimensions drawn per trial); none for Optuna."""
    if spec.search == "optuna":
        return []
    from numpy.random import default_rng
    from ray.tune.search.variant_generator import generate_variants

    rng, prefix = default_rng(spec.seed), secrets.token_hex(3)[:5]
    space = {key: tune_domain(domain) for key, domain in spec.space.items()}
    params = [resolved for _ in range(num_samples) for _, resolved in generate_variants(space, random_state=rng)]
    return [{"id": f"{prefix}_{i:05d}", "params": json.loads(json.dumps(p))} for i, p in enumerate(params)]


def plan_path(storage: str, name: str) -> str:
    return f"{storage}/{name}/{PLAN_FILE}"


def write_plan(storage: str, name: str, spec: SweepSpec, num_samples: int, trials: list[dict[str, Any]]) -> None:
    """Replace the plan atomically (a temporary file, fsync, rename; one put on s3://, gs://)."""
    text = json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION, "space": spec.space, "search": spec.search,
                       "num_samples": num_samples, "trials": trials}, indent=1)
    path = plan_path(storage, name)
    if "://" in storage:
        fs, fs_path = _filesystem(path)
        with fs.open_output_stream(fs_path) as f:
            f.write(text.encode())
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_plan(storage: str, name: str, spec: SweepSpec, num_samples: int,
              cfg: RunConfig) -> Optional[list[dict[str, Any]]]:
    """The recorded trials (None: no plan yet), checked as untrusted data: a ConfigError naming the
    file for anything but the plan this space and --num-samples would make, with valid params."""
    path = plan_path(storage, name)
    fs, fs_path = _filesystem(path)
    from pyarrow.fs import FileType

    if fs.get_file_info(fs_path).type == FileType.NotFound:
        return None
    with fs.open_input_stream(fs_path) as f:
        raw = f.read(MAX_PLAN_BYTES + 1)
    if len(raw) > MAX_PLAN_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PLAN_BYTES >> 20} MB; accepted: {ACCEPTED_PLAN}")
    try:
        data = json.loads(raw.decode())
    except (ValueError, RecursionError):
        raise ConfigError(f"{path}: not valid JSON; accepted: {ACCEPTED_PLAN}") from None
    _check_header(data, spec, num_samples, path, name)
    trials = data["trials"]
    expected = spec.num_trials(num_samples)
    complete = len(trials) <= num_samples if spec.search == "optuna" else len(trials) == expected  # Optuna's grow
    if not complete:
        raise ConfigError(f"{path}: holds {len(trials)} trials, this sweep has {expected}; accepted: {ACCEPTED_PLAN}")
    seen: set[str] = set()
    for trial in trials:
        _check_trial(trial, spec, cfg, path, name, seen)
    return [{"id": t["id"], "params": t["params"]} for t in trials]


def _check_header(data: Any, spec: SweepSpec, num_samples: int, path: str, name: str) -> None:
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION \
            or not isinstance(data.get("trials"), list):
        raise ConfigError(f"{path}: not an alignprop sweep plan (format {PLAN_FORMAT} v{PLAN_VERSION}); "
                          f"accepted: {ACCEPTED_PLAN}")
    mine = json.loads(json.dumps({"space": spec.space, "search": spec.search, "num_samples": num_samples}))
    differs = [key for key in mine if data.get(key) != mine[key]]
    if differs:
        raise ConfigError(f"{path}: sweep {name!r} was started with another {' and '.join(differs)}; accepted: "
                          "the same --space and --num-samples to resume it, or a new --name")


def _check_trial(trial: Any, spec: SweepSpec, cfg: RunConfig, path: str, name: str, seen: set[str]) -> None:
    ok = isinstance(trial, dict) and isinstance(trial.get("id"), str) and isinstance(trial.get("params"), dict)
    if not ok or not TRIAL_ID.fullmatch(trial["id"]) or trial["id"] in seen or set(trial["params"]) != set(spec.space):
        keys = ", ".join(spec.space)
        raise ConfigError(f"{path}: a trial is not {{id: <unique letters, digits, _>, params: {{{keys}}}}}; "
                          f"accepted: {ACCEPTED_PLAN}")
    seen.add(trial["id"])
    for key, value in trial["params"].items():
        if not in_domain(value, spec.space[key]):
            raise ConfigError(f"{path}: trial {trial['id']}: {key}={value!r} is outside the space; accepted: values of "
                              f"{spec.space[key]}")
    try:
        apply_params(cfg, trial["params"])
    except ConfigError as err:
        raise ConfigError(f"{path}: trial {trial['id']}: {err}") from None


def in_domain(value: Any, domain: dict[str, Any]) -> bool:
    """Whether `value` is one the space entry can produce (bounds inclusive for floats, as sampled)."""
    kind = domain["space"]
    if kind in ("choice", "grid_search"):
        return any(value == v and type(value) is type(v) or _same_number(value, v) for v in domain[SPACE_LIST[kind]])
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    lower, upper = domain["lower"], domain["upper"]
    if kind == "randint":
        return isinstance(value, int) and lower <= value < upper
    if kind == "quniform":
        q = domain["q"]
        steps = value / q
        return abs(steps - round(steps)) < 1e-6 and round(lower / q) * q <= value <= round(upper / q) * q
    return _at_least(value, lower) and _at_least(upper, value)


def _at_least(a: float, b: float) -> bool:
    """a >= b, up to float rounding (Ray draws loguniform as exp(uniform(log lower, log upper)))."""
    return a >= b or math.isclose(a, b, rel_tol=1e-9)


SPACE_LIST = {"choice": "categories", "grid_search": "values"}


def _same_number(a: Any, b: Any) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return numbers and a == b


def ignored_tune_state(storage: str, name: str) -> list[str]:
    """Ray Tune state files and pickles at the top of the sweep directory (an older alignprop's, or
    planted): listed so the user knows they are there; nothing here is ever loaded."""
    from pyarrow.fs import FileSelector, FileType

    fs, fs_path = _filesystem(f"{storage}/{name}")
    if fs.get_file_info(fs_path).type != FileType.Directory:
        return []
    infos = fs.get_file_info(FileSelector(fs_path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == FileType.File and TUNE_STATE.fullmatch(i.base_name))


def _filesystem(path: str):
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(path if "://" in path else os.path.abspath(path))


# ------------------------------------------------------------------------------- MLflow records
def sweep_children(uri: str, experiment: str, name: str) -> dict[str, Any]:
    """{trial id: MLflow run} of the sweep's trials (runs tagged with the sweep and a trial id)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], max_results=50000,
                              filter_string=f"tags.`alignprop.sweep` = {quote_filter_value(name)}")
    return {r.data.tags["alignprop.trial_id"]: r for r in runs if r.data.tags.get("alignprop.trial_id")}


def is_done(run: Any) -> bool:
    """A trial that is not run again: it finished, or ASHA stopped it (KILLED, tagged early-stopped)."""
    status = run.info.status
    return status == "FINISHED" or (status == "KILLED" and run.data.tags.get("alignprop.early_stopped") == "true")


def metric_history(uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, metric) as each step's report to Tune carried it: the latest value logged at or before it."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    steps = sorted({int(m.step) for m in client.get_metric_history(run_id, "step") if m.step > 0})
    values = sorted((int(m.step), m.timestamp, float(m.value)) for m in client.get_metric_history(run_id, metric))
    history, i, last = [], 0, None
    for step in steps:
        while i < len(values) and values[i][0] <= step:
            last, i = values[i][2], i + 1
        if last is not None and math.isfinite(last):
            history.append((step, last))
    return history


def trial_label(trial: Any) -> str:
    """Our trial id of a Tune trial: the planned id, else (Optuna's new trials) Tune's own."""
    planned = (trial.config or {}).get(TRIAL_KEY)
    return planned if isinstance(planned, str) else trial.trial_id


# --------------------------------------------------------------------------------------- Tune
class SeededASHA(ASHAScheduler):
    """ASHA on the training step whose rungs start with the results the sweep already has.

    `prior`: {trial id: [(step, metric)]} of trials this Tune run does not run (done, or run earlier),
    replayed once under their own ids; `resumed`: the history of trials it continues, replayed under the
    Tune trial that continues each one, so the rungs it already passed are recorded and not judged again.
    Replayed decisions are ignored: what ran, ran. Only TrialScheduler's public methods are called."""

    def __init__(self, metric: str, prior: dict[str, list], resumed: dict[str, list], **kwargs):
        super().__init__(time_attr="step", **kwargs)
        self._alignprop_metric, self._alignprop_prior, self._alignprop_resumed = metric, dict(prior), dict(resumed)

    def on_trial_add(self, tune_controller, trial) -> None:
        prior, self._alignprop_prior = self._alignprop_prior, {}
        for trial_id, history in prior.items():
            stub = SimpleNamespace(trial_id=f"alignprop-prior-{trial_id}", config={})
            super().on_trial_add(tune_controller, stub)
            self._replay(tune_controller, stub, history)
            super().on_trial_remove(tune_controller, stub)
        super().on_trial_add(tune_controller, trial)
        self._replay(tune_controller, trial, self._alignprop_resumed.pop(trial_label(trial), ()))

    def _replay(self, tune_controller, trial, history) -> None:
        for step, value in history:
            super().on_trial_result(tune_controller, trial, {"step": step, self._alignprop_metric: value})


class PlanRecorder(Callback):
    """Optuna's trials are not known up front: record each one's id and params as it starts (before
    its trial function runs), so a rerun continues it with the same config under the same id."""

    def __init__(self, storage: str, name: str, spec: SweepSpec, num_samples: int, trials: list[dict[str, Any]]):
        self.storage, self.name, self.spec, self.num_samples, self.trials = storage, name, spec, num_samples, trials

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial_label(trial)
        if all(t["id"] != trial_id for t in self.trials):
            params = {key: trial.config[key] for key in self.spec.space}
            self.trials.append({"id": trial_id, "params": json.loads(json.dumps(params))})
            write_plan(self.storage, self.name, self.spec, self.num_samples, self.trials)


# ------------------------------------------------------------------------------------ summary
PROXY_KEY = "eval/reward_total"  # the trained reward on the held-out prompts: beside a gold metric in the tables


def summary_rows(trials: list[dict[str, Any]], children: dict[str, Any], tune_status: dict[str, str],
                 spec: SweepSpec, max_steps: int) -> list[dict[str, Any]]:
    """One row per planned trial from our records: the MLflow child (steps, metric) and, for trials
    run in this session, Tune's in-memory status. error: failed, or never opened its run;
    complete: reached max_steps or stopped itself early; stopped: ASHA stopped it."""
    rows = []
    for trial in trials:
        run = children.get(trial["id"])
        metrics = run.data.metrics if run is not None else {}
        steps = int(metrics.get("step", 0))
        failed = run is None or tune_status.get(trial["id"]) == "ERROR" or run.info.status in ("FAILED", "RUNNING")
        finished = steps >= max_steps or metrics.get("early_stopped")
        status = "error" if failed else ("complete" if finished else "stopped")
        value = metrics.get(spec.metric, math.nan)
        proxy = {PROXY_KEY: metrics.get(PROXY_KEY, math.nan)} if spec.metric != PROXY_KEY else {}
        rows.append({"trial_id": trial["id"], "status": status, "steps": steps, spec.metric: value, **proxy,
                     **{key: trial["params"].get(key) for key in spec.space}})
    return rows
