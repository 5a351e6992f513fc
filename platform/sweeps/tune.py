"""`alignprop tune`: a Ray Tune sweep whose trials are full AlignProp Ray Train runs, in MLflow.

    alignprop tune --config tiny-cpu --space k_lr --num-samples 8
    alignprop tune --config tiny-cpu --space tune_spaces/k_lr.yaml --max-concurrent 2 --address auto

One MLflow parent run per sweep, one child run per trial (`mlflow.parentRunId`); at the end the
parent gets the results table, a plot of the metric against each searched parameter, the best
trial's id and config, and its LoRA. Rerunning with the same sweep name resumes the sweep.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from ray.tune import Callback

from ..config import SAFE_NAME, SAFE_NAME_TEXT, ConfigError, RunConfig, flatten, from_dict, run_name, to_dict, to_yaml
from ..launch import build_trainer, driver_session, fit_interruptibly, resolve_storage_path, resolved_tracking_uri
from ..mlflow_model import check_model_name, log_run_model
from ..tracking import prompt_sets, run_context_tags, tracked_run
from .space import SweepSpec, apply_params, tune_domain
from .summary import close_child_runs, summarize

TRIAL_CPU = 0.02  # the trial's own driver; its Train workers reserve their own resources


def run_trial(params: dict[str, Any], base: dict, sweep: dict) -> None:
    """One Tune trial: the sampled params onto the base config → a TorchTrainer reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(from_dict(base), params)
    cfg.tracking.run_name = f"{sweep['name']}-{trial_id}"
    tags = {**sweep["context_tags"],  # the driver's user/source/commit: in a trial, argv is Ray's worker
            "mlflow.parentRunId": sweep["parent_run_id"], "alignprop.sweep": sweep["name"],
            "alignprop.trial_id": trial_id}
    with tracked_run(sweep["tracking_uri"], sweep["experiment"], run_name(cfg), flatten(to_dict(cfg)), to_yaml(cfg),
                     tags,
                     datasets=prompt_sets(cfg)) as run_id:
        build_trainer(cfg, sweep["tracking_uri"], run_id, callbacks=[TuneReportCallback()],
                      storage_path=sweep["trials_path"]).fit()
        # runs:/<run_id>/model; for a trial the scheduler stops, the summary logs it
        log_run_model(sweep["tracking_uri"], run_id)


def _scheduler(spec: SweepSpec, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler

    if spec.scheduler == "none":
        return None
    return ASHAScheduler(time_attr="training_iteration", max_t=max_steps, grace_period=spec.grace_period,
                         reduction_factor=spec.reduction_factor)


def _search(spec: SweepSpec):
    if spec.search == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=spec.seed)


def default_concurrency(cfg: RunConfig) -> int:
    """As many trials as the cluster's CPUs hold, each needing its workers' CPUs plus TRIAL_CPU."""
    import ray

    per_worker = cfg.ray.resources_per_worker.get("CPU", 1.0)
    per_trial = cfg.ray.num_workers * per_worker + TRIAL_CPU
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


class TrialProgress(Callback):
    """Prints one line per finished trial."""

    def __init__(self, metric: str, total: int):
        self.metric, self.total, self.done = metric, total, 0

    def _line(self, trial, how: str) -> None:
        self.done += 1
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{value:.5g}" if isinstance(value, float) else "n/a"
        print(f"[tune] {self.done}/{self.total} trial {trial.trial_id} {how} after {result.get('step', 0)} steps: "
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
    tags = {"alignprop.sweep": name, "alignprop.role": "sweep"}
    with driver_session(cfg, name, storage, uri, experiment, parent_params, to_yaml(cfg), tags) as parent_id:
        print(f"[tune] sweep {name}  mlflow {uri} parent run {parent_id}", file=sys.stderr)
        try:
            return _fit(cfg, spec, num_samples, max_concurrent, name, register_as, trial_retries, uri, experiment,
                        storage, parent_id)
        except KeyboardInterrupt:
            close_child_runs(uri, parent_id, "KILLED")  # the trials die with this process
            raise


def _fit(cfg: RunConfig, spec: SweepSpec, num_samples: int, max_concurrent: Optional[int], name: str,
         register_as: Optional[str], trial_retries: int, uri: str, experiment: str, storage: str,
         parent_id: str) -> dict[str, Any]:
    """Build (or restore) the Tuner, run it, summarise into the parent run."""
    from ray import tune

    concurrency = max_concurrent or default_concurrency(cfg)
    sweep = {"name": name, "parent_run_id": parent_id, "tracking_uri": uri, "experiment": experiment,
             "trials_path": f"{storage}/{name}/trials",
             "context_tags": run_context_tags()}  # local path or s3://, gs:// alike
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=to_dict(cfg), sweep=sweep), {"CPU": TRIAL_CPU})
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"[tune] resuming sweep from {path}", file=sys.stderr)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune_domain(domain) for key, domain in spec.space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=_scheduler(spec, cfg.trainer.max_steps),
                search_alg=_search(spec), num_samples=num_samples, max_concurrent_trials=concurrency,
                trial_name_creator=lambda trial: f"{name}-{trial.trial_id}",
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=trial_retries),
                                      callbacks=[TrialProgress(spec.metric, spec.num_trials(num_samples))]),
        )
    results = fit_interruptibly(tuner)  # Ctrl-C reaches the main thread at once, as for alignprop train
    return summarize(results, spec, cfg.trainer.max_steps, uri, parent_id, concurrency, register_as)
