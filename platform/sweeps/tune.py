"""`alignprop tune`: a Ray Tune sweep whose trials are full AlignProp Ray Train runs, in MLflow.

    alignprop tune --config tiny-cpu --space k_lr --num-samples 8
    alignprop tune --config tiny-cpu --space tune_spaces/k_lr.yaml --max-concurrent 2 --address auto

One MLflow parent run per sweep, one child run per trial (`mlflow.parentRunId`); at the end the
parent gets the results table, a plot of the metric against each searched parameter, the best
trial's id and config, and its LoRA. Rerunning with the same sweep name resumes the sweep from our
own records (resume.py), never from Ray Tune's pickled state: done trials are not
rerun, the others continue from their last safetensors checkpoint under the same trial id.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from ray.tune import Callback

from ..config import (SAFE_NAME, SAFE_NAME_TEXT, ConfigError, RunConfig, flatten, from_dict, run_name, run_params,
                      to_dict, to_yaml)
from ..launch import (build_trainer, check_local_resources, check_resume_safety, driver_session, ray_address,
                      resolve_storage_path, resolved_tracking_uri, run_interruptibly)
from ..mlflow_model import check_model_name, log_run_model
from ..tracking import prompt_sets, run_context_tags, tracked_run
from ..tracking.overoptimisation import log_overoptimisation_plot
from .resume import (PLAN_FILE, TRIAL_KEY, PlanRecorder, SeededASHA, ignored_tune_state, is_done, metric_history,
                     new_plan, plan_path, read_plan, summary_rows, sweep_children, trial_label, write_plan)
from .space import SweepSpec, apply_params, extreme_rows, tune_domain
from .summary import close_child_runs, summarize

TRIAL_CPU = 0.02  # the trial's own driver; its Train workers reserve their own resources


def run_trial(config: dict[str, Any], base: dict, sweep: dict, plan: dict[str, dict]) -> None:
    """One Tune trial: its params onto the base config → a TorchTrainer reporting to Tune. A planned
    trial's config is only its id (the run name, so a rerun resumes it), its params come from `plan`
    (never through Tune's variant resolution, which evaluates `{eval: ...}`); Optuna's new trials
    take Tune's id and the sampled params."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    planned = config.get(TRIAL_KEY)
    trial_id, params = (planned, plan[planned]) if planned else (tune.get_context().get_trial_id(), config)
    cfg = apply_params(from_dict(base), params)
    cfg.tracking.run_name = f"{sweep['name']}-{trial_id}"
    tags = {**sweep["context_tags"],  # the driver's user/source/commit: in a trial, argv is Ray's worker
            "mlflow.parentRunId": sweep["parent_run_id"], "alignprop.sweep": sweep["name"],
            "alignprop.trial_id": trial_id}
    with tracked_run(sweep["tracking_uri"], sweep["experiment"], run_name(cfg), run_params(cfg), to_yaml(cfg),
                     tags,
                     datasets=prompt_sets(cfg)) as run_id:
        build_trainer(cfg, sweep["tracking_uri"], run_id, callbacks=[TuneReportCallback()],
                      storage_path=sweep["trials_path"], progress=False).fit()  # TrialProgress prints it
        # runs:/<run_id>/model; for a trial the scheduler stops, the summary logs it
        log_run_model(sweep["tracking_uri"], run_id)
        log_overoptimisation_plot(sweep["tracking_uri"], run_id, cfg)


def _scheduler(spec: SweepSpec, max_steps: int, prior: Optional[dict] = None, resumed: Optional[dict] = None):
    """ASHA on the training step, its rungs seeded with the sweep's earlier results (SeededASHA). A
    trial at max_steps ends by itself: not stopped by ASHA there (which interrupted its FINISHED close)."""
    if spec.scheduler == "none":
        return None
    return SeededASHA(spec.metric, prior or {}, resumed or {}, max_t=max_steps, grace_period=spec.grace_period,
                      reduction_factor=spec.reduction_factor, stop_last_trials=False)


def _search(spec: SweepSpec, evaluated: tuple[list[dict], list[float]] = ([], [])):
    """Optuna for `search: optuna`, told the results of the sweep's trials so far (`evaluated`)."""
    if spec.search == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch

    points, rewards = evaluated  # a seed per number of known results: a resumed study does not redraw its first draws
    return OptunaSearch(seed=spec.seed + len(points), points_to_evaluate=points or None,
                        evaluated_rewards=rewards or None)


def default_concurrency(cfg: RunConfig) -> int:
    """As many trials as the cluster's CPUs hold, each needing its workers' CPUs plus TRIAL_CPU."""
    import ray

    per_worker = cfg.ray.resources_per_worker.get("CPU", 1.0)
    per_trial = cfg.ray.num_workers * per_worker + TRIAL_CPU
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


class TrialProgress(Callback):
    """The sweep's console, printed by the driver in the order things happen: a line per tenth of each
    trial's steps, labelled by the trial (the workers print none: Ray would prefix theirs with a worker
    pid, merge parallel trials' lines that differ only in digits, and deliver the last ones after the
    closing summary), and one line per finished trial."""

    def __init__(self, metric: str, total: int, done: int = 0, max_steps: int = 0):
        self.metric, self.total, self.done, self.every = metric, total, done, max(1, max_steps // 10)
        self.max_steps = max_steps

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = result.get("step")
        if not isinstance(step, int) or (step % self.every and step != self.max_steps):
            return
        value = result.get(self.metric)
        shown = f" {self.metric}={value:.5g}" if isinstance(value, float) else ""
        reward = result.get("reward/total_mean")
        train = f" reward={reward:.4f}" if isinstance(reward, float) else ""
        print(f"[trial {trial_label(trial)}] step {step}/{self.max_steps}{train}{shown}", flush=True)

    def _line(self, trial, how: str) -> None:
        self.done += 1
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{value:.5g}" if isinstance(value, float) else "n/a"
        print(f"[tune] {self.done}/{self.total} trial {trial_label(trial)} {how} after {result.get('step', 0)} steps: "
              f"{self.metric}={shown}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")


def run_sweep(cfg: RunConfig, spec: SweepSpec, num_samples: int, max_concurrent: Optional[int] = None,
              sweep_name: Optional[str] = None, register_as: Optional[str] = None,
              trial_retries: int = 0) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary (also logged to the MLflow parent run).

    Failures nest: `ray.max_failures` restarts a trial's Train workers from its last checkpoint;
    `trial_retries` reruns a trial that still failed, and its TorchTrainer (same run name)
    resumes from that checkpoint too. A trial that fails for good does not stop the sweep."""
    name = sweep_name or f"{cfg.name}-{spec.name}"
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"--name: got {name!r}; accepted: {SAFE_NAME_TEXT}")
    if register_as is not None:
        check_model_name(register_as)
    uri, experiment = resolved_tracking_uri(cfg), cfg.tracking.experiment or cfg.name
    storage = resolve_storage_path(cfg.ray.storage_path)
    parent_params = {"sweep.space": json.dumps(spec.space), "sweep.metric": spec.metric, "sweep.mode": spec.mode,
                     "sweep.scheduler": spec.scheduler, "sweep.search": spec.search, "sweep.num_samples": num_samples,
                     **flatten(to_dict(cfg))}
    tags, planned = {"alignprop.sweep": name, "alignprop.role": "sweep"}, {}
    if ray_address(cfg) is None:
        check_trials_fit(cfg, spec)

    def plan_trials() -> None:  # under the sweep's lock, before Ray starts: a bad plan takes no resources
        planned["trials"] = _plan(cfg, spec, num_samples, name, storage, uri, experiment)

    with driver_session(cfg, name, storage, uri, experiment, parent_params, to_yaml(cfg), tags,
                        prepare=plan_trials) as parent_id:
        print(f"[tune] sweep {name}  mlflow {uri} parent run {parent_id}", file=sys.stderr)
        try:
            summary = _fit(cfg, spec, num_samples, max_concurrent, name, register_as, trial_retries, uri,
                           experiment, storage, parent_id, planned["trials"])
            return {**summary, "name": name, "tracking_uri": uri}
        except KeyboardInterrupt:
            close_child_runs(uri, parent_id, "KILLED")  # the trials die with this process
            raise


def check_trials_fit(cfg: RunConfig, spec: SweepSpec) -> None:
    """On a local Ray, every trial must fit this machine: each combination of the space's extremes
    (e.g. a `ray.num_workers` choice of 64) is checked like one `alignprop train`, before Ray starts."""
    for row in extreme_rows(spec.space):
        try:
            check_local_resources(apply_params(cfg, row))
        except ConfigError as err:
            shown = ", ".join(f"{k}={v}" for k, v in row.items())
            raise ConfigError(f"space ({shown}): {err}") from None


def _plan(cfg: RunConfig, spec: SweepSpec, num_samples: int, name: str, storage: str, uri: str,
          experiment: str) -> list[dict]:
    """The sweep's trials: read back from our plan (validated) on a rerun, else sampled and written now.
    Refuses, in one line, a sweep MLflow knows but that has no plan, and a trial checkpoint holding
    a file we would not load."""
    ignored = ignored_tune_state(storage, name)
    if ignored:
        shown = ", ".join(ignored[:6]) + (f" and {len(ignored) - 6} more" if len(ignored) > 6 else "")
        print(f"[tune] ignoring {shown} in {storage}/{name}: Ray Tune state and pickles are never loaded "
              f"(a sweep resumes from {PLAN_FILE}, MLflow and each trial's safetensors checkpoints)", file=sys.stderr)
    children = sweep_children(uri, experiment, name)
    trials = read_plan(storage, name, spec, num_samples, cfg)
    if trials is None and children:
        raise ConfigError(f"{plan_path(storage, name)}: missing, but MLflow holds {len(children)} trials of sweep "
                          f"{name!r} (started by an alignprop that resumed through Ray Tune's pickled state, which is "
                          "no longer loaded); accepted: a new --name")
    if trials is None:
        trials = new_plan(spec, num_samples)
        write_plan(storage, name, spec, num_samples, trials)
    pending = _pending(trials, children)
    if children:
        done = len(trials) - len(pending)
        print(f"[tune] resuming sweep {name} from {PLAN_FILE} and MLflow: {done} of {len(trials)} planned trials done, "
              f"{len(pending)} to continue", file=sys.stderr)
    for trial in pending:
        check_resume_safety(f"{storage}/{name}/trials", f"{name}-{trial['id']}")
    return trials


def _pending(trials: list[dict], children: dict[str, Any]) -> list[dict]:
    """The planned trials that run (again): all but those whose MLflow run finished or ASHA stopped."""
    return [t for t in trials if not (t["id"] in children and is_done(children[t["id"]]))]


def _fit(cfg: RunConfig, spec: SweepSpec, num_samples: int, max_concurrent: Optional[int], name: str,
         register_as: Optional[str], trial_retries: int, uri: str, experiment: str, storage: str, parent_id: str,
         trials: list[dict]) -> dict[str, Any]:
    """Run the trials that are not done (fixed configs), then, for Optuna, new trials up to
    num_samples (told every result so far); summarise all trials into the parent run."""
    from ray import tune

    concurrency = max_concurrent or default_concurrency(cfg)
    sweep = {"name": name, "parent_run_id": parent_id, "tracking_uri": uri, "experiment": experiment,
             "trials_path": f"{storage}/{name}/trials", "context_tags": run_context_tags()}  # local or s3://, gs://
    plan = {t["id"]: t["params"] for t in trials}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=to_dict(cfg), sweep=sweep, plan=plan),
                                    {"CPU": TRIAL_CPU})
    children = sweep_children(uri, experiment, name)
    pending = _pending(trials, children)
    total = len(trials) if spec.search != "optuna" else num_samples
    session, max_steps = time.strftime("%Y-%m-%d_%H-%M-%S"), cfg.trainer.max_steps
    progress, statuses = TrialProgress(spec.metric, total, done=len(trials) - len(pending), max_steps=max_steps), {}

    def run(part: str, param_space: dict, count: int, scheduler, search=None, callbacks=()) -> None:
        """One fresh Tune experiment in <sweep>/tune/<session>-<part>/: written by Tune, never read back.
        tune.run, not Tuner.fit: Tuner's ResultGrid unpickles an errored trial's error.pkl from storage."""
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine prints a box even at verbose=0
        os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "30")  # "… took 2.0 s, which may be a performance bottleneck"
        # in a thread that Ctrl-C interrupts at once, as for alignprop train (launch/trainer.py)
        analysis = run_interruptibly(lambda: tune.run(
            trainable, config=param_space, num_samples=count, metric=spec.metric, mode=spec.mode, scheduler=scheduler,
            search_alg=search, max_concurrent_trials=concurrency, max_failures=trial_retries,
            raise_on_failed_trial=False, storage_path=f"{storage}/{name}/tune", name=f"{session}-{part}", verbose=0,
            callbacks=[progress, *callbacks], trial_dirname_creator=trial_label,
            trial_name_creator=lambda trial: f"{name}-{trial_label(trial)}"))
        statuses.update({trial_label(t): t.status for t in analysis.trials})

    if pending:  # the fixed configs; ASHA knows the done trials' results and each pending trial's past
        histories = {t["id"]: metric_history(uri, children[t["id"]].info.run_id, spec.metric) if t["id"] in children
                     else [] for t in trials}
        prior = {tid: h for tid, h in histories.items() if all(tid != t["id"] for t in pending)}
        resumed = {t["id"]: histories[t["id"]] for t in pending}
        run("trials", {TRIAL_KEY: tune.grid_search([t["id"] for t in pending])}, 1,
            _scheduler(spec, max_steps, prior, resumed))
    remaining = num_samples - len(trials) if spec.search == "optuna" else 0
    if remaining > 0:  # Optuna's new trials, told every result so far; recorded in the plan as they start
        children = sweep_children(uri, experiment, name)
        known = [t for t in trials if t["id"] in children and spec.metric in children[t["id"]].data.metrics]
        evaluated = ([t["params"] for t in known], [children[t["id"]].data.metrics[spec.metric] for t in known])
        prior = {t["id"]: metric_history(uri, children[t["id"]].info.run_id, spec.metric) for t in known}
        recorder = PlanRecorder(storage, name, spec, num_samples, trials)
        run("search", {key: tune_domain(domain) for key, domain in spec.space.items()}, remaining,
            _scheduler(spec, max_steps, prior), _search(spec, evaluated), [recorder])
    rows = _close_stopped_and_rows(trials, statuses, spec, max_steps, uri, experiment, name)
    return summarize(rows, spec, uri, parent_id, concurrency, register_as)


def _close_stopped_and_rows(trials: list[dict], statuses: dict[str, str], spec: SweepSpec, max_steps: int, uri: str,
                            experiment: str, name: str) -> list[dict[str, Any]]:
    """A trial Tune ended normally this session whose run is not FINISHED was ended by Tune before it
    could close its run (left RUNNING, or FAILED by the interruption). It ran all `max_steps`: FINISHED
    (ASHA's stop at max_t only ends a complete trial); fewer: ASHA stopped it, KILLED and tagged
    early-stopped, so a rerun leaves it stopped. Either keeps its own end time, that of its last logged
    step. Then one row per trial from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for trial_id, run in sweep_children(uri, experiment, name).items():
        if run.info.status != "FINISHED" and statuses.get(trial_id) == "TERMINATED":
            complete = run.data.metrics.get("step", 0) >= max_steps
            if not complete:
                client.set_tag(run.info.run_id, "alignprop.early_stopped", "true")
            client.set_terminated(run.info.run_id, status="FINISHED" if complete else "KILLED",
                                  end_time=_last_logged_ms(client, run))
    return summary_rows(trials, sweep_children(uri, experiment, name), statuses, spec, max_steps)


def _last_logged_ms(client, run) -> Optional[int]:
    """When the run logged its last step (ms), or None (now) if it logged none."""
    history = client.get_metric_history(run.info.run_id, "step")
    return max((m.timestamp for m in history), default=None)
