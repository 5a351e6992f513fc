"""Resuming a sweep unpickles nothing from `ray.storage_path`.

Ray Tune's own resume (`Tuner.restore`) unpickles `tuner.pkl`, the cloudpickle blobs embedded in
`experiment_state-*.json` (`CLOUDPICKLE_FALLBACK`, and every `Trial`'s non-JSON fields), the
searcher's `basic-variant-state-*.json` / `search_gen_state-*.json` / `searcher-state-*.pkl` (pickles,
whatever the suffix) and `callback-states-*.pkl`: anyone who can write the storage path runs code on
the next rerun. alignprop resumes from its own records instead (`platform/sweeps/resume.py`): the
trial plan it wrote as JSON, the MLflow child runs, each trial's safetensors checkpoints.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from alignprop.platform.config import load_config
from alignprop.platform.sweeps.space import load_space

# What Ray Tune 2.60 reads back on `Tuner.restore` (file name -> how it is written, see the module docstring).
STAMP = "2099-01-01_00-00-00"  # newer than any real session: Tune would pick these first
TUNE_STATE_FILES = ("tuner.pkl", f"experiment_state-{STAMP}.json", f"basic-variant-state-{STAMP}.json",
                    f"search_gen_state-{STAMP}.json", f"searcher-state-{STAMP}.pkl", f"callback-states-{STAMP}.pkl")


class _Payload:
    """Unpickling this writes `marker`: proof that the file was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "ran")


def plant_tune_state(experiment: Path, markers: Path) -> list[Path]:
    """Payloads under every name Ray Tune loads on resume; returns the marker each would write."""
    from ray import cloudpickle
    from ray._common.utils import binary_to_hex

    experiment.mkdir(parents=True, exist_ok=True)
    planted = []
    for name in TUNE_STATE_FILES:
        marker = markers / f"ran-{name}"
        payload = cloudpickle.dumps(_Payload(marker))
        if name.startswith("experiment_state"):  # JSON, with the blob Ray's decoder expands (`_loads_with_cloudpickle`)
            blob = {"_type": "CLOUDPICKLE_FALLBACK", "value": binary_to_hex(payload)}
            (experiment / name).write_text(json.dumps({"runner_data": blob, "trial_data": [], "stats": {}}))
        else:
            (experiment / name).write_bytes(payload if name != "tuner.pkl" else pickle.dumps({"x": _Payload(marker)}))
        planted.append(marker)
    return planted


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


def _sweep_config(tmp: Path):
    return load_config("tiny-cpu", [
        "ray.num_workers=1", "ray.resources_per_worker={CPU: 0.98}", "trainer.max_steps=3", "trainer.eval_every=1",
        "trainer.ckpt_every=1", f"ray.storage_path={tmp}/ray", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        "tracking.experiment=resume-safety",
    ])


def _children(uri: str, parent_id: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["alignprop.trial_id"]: r for r in runs}


def _steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, "step"))


@pytest.mark.slow
def test_a_rerun_sweep_loads_no_planted_pickle_and_resumes_from_its_own_records(tmp_path, local_ray, capsys):
    """Trial A finishes; trial B fails at step 2 after its step-1 checkpoint. With payloads planted
    under every name Tune would load, the rerun runs none of them, leaves A alone and continues B
    (same trial id, same MLflow child run) from its checkpoint to step 3, each step logged once."""
    from alignprop.platform.sweeps.tune import run_sweep

    space = tmp_path / "fail.yaml"
    space.write_text("scheduler: none\nspace:\n  trainer.fail_at_step: {space: grid_search, values: [null, 2]}\n")
    cfg = _sweep_config(tmp_path)
    spec = load_space(str(space), cfg)
    first = run_sweep(cfg, spec, num_samples=1, max_concurrent=2, sweep_name="planted")
    assert sorted(r["status"] for r in first["rows"]) == ["complete", "error"], first["rows"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    before = _children(uri, first["parent_run_id"])
    failed = next(r["trial_id"] for r in first["rows"] if r["status"] == "error")
    done = next(r["trial_id"] for r in first["rows"] if r["status"] == "complete")
    assert _steps(uri, before[failed].info.run_id) == [1]

    markers = tmp_path / "markers"
    markers.mkdir()
    planted = plant_tune_state(tmp_path / "ray" / "planted", markers)
    capsys.readouterr()
    error = None
    try:
        again = run_sweep(cfg, spec, num_samples=1, max_concurrent=2, sweep_name="planted")
    except Exception as err:  # the old code: the unpickled payload breaks Tune's restore after running
        error = err
    ran = [m.name for m in planted if m.exists()]
    assert ran == [], f"payloads ran: {ran}"
    assert error is None, repr(error)

    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "never loaded" in line]
    assert len(notices) == 1 and "tuner.pkl" in notices[0], err[-3000:]
    assert again["parent_run_id"] == first["parent_run_id"]
    assert {r["trial_id"]: r["status"] for r in again["rows"]} == {done: "complete", failed: "complete"}, again["rows"]
    after = _children(uri, first["parent_run_id"])
    assert set(after) == set(before)
    assert after[failed].info.run_id == before[failed].info.run_id and after[failed].info.status == "FINISHED"
    assert _steps(uri, after[failed].info.run_id) == [1, 2, 3], "resumed from the step-1 checkpoint, each step once"
    assert after[done].info.end_time == before[done].info.end_time, "the finished trial did not run again"
    assert _steps(uri, after[done].info.run_id) == [1, 2, 3]


# ------------------------------------------------------------------------ our records, as untrusted data
def _smoke(tmp_path: Path):
    from alignprop.platform.sweeps.resume import new_plan, write_plan

    cfg = load_config("tiny-cpu", [f"ray.storage_path={tmp_path}/ray"])
    spec = load_space("tiny-smoke", cfg)  # optim.lr loguniform [1e-3, 1e-1], truncation.k choice [2, 5, 10]
    trials = new_plan(spec, 4)
    (tmp_path / "ray" / "s").mkdir(parents=True)
    write_plan(f"{tmp_path}/ray", "s", spec, 4, trials)
    return cfg, spec, trials


def test_the_plan_is_seeded_complete_and_reads_back(tmp_path):
    from alignprop.platform.sweeps.resume import in_domain, new_plan, read_plan

    cfg, spec, trials = _smoke(tmp_path)
    assert len(trials) == spec.num_trials(4) == 4 and len({t["id"] for t in trials}) == 4
    assert [t["params"] for t in new_plan(spec, 4)] == [t["params"] for t in trials], "seeded by the space's seed"
    assert all(in_domain(v, spec.space[k]) for t in trials for k, v in t["params"].items())
    assert read_plan(f"{tmp_path}/ray", "s", spec, 4, cfg) == trials


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["trials"][0]["params"].update({"optim.lr": 0.5}), "optim.lr=0.5 is outside the space"),
    (lambda d: d["trials"][0]["params"].update({"truncation.k": 3}), "truncation.k=3 is outside the space"),
    (lambda d: d["trials"][1]["params"].update({"trainer.prompt_file": "/etc/passwd"}), "a trial is not {id"),
    (lambda d: d["trials"][1].update({"id": "../../elsewhere"}), "a trial is not {id"),
    (lambda d: d["trials"][2].update({"id": d["trials"][3]["id"]}), "a trial is not {id"),
    (lambda d: d["trials"].pop(), "holds 3 trials, this sweep has 4"),
    (lambda d: d.update({"num_samples": 8}), "was started with another num_samples"),
    (lambda d: d["space"]["optim.lr"].update({"upper": 1.0}), "was started with another space"),
    (lambda d: d.update({"format": "ray-tune"}), "not an alignprop sweep plan"),
], ids=["float-out", "choice-out", "extra-key", "id-path", "id-duplicate", "missing-trial", "num-samples", "space",
        "format"])
def test_a_tampered_plan_is_one_config_error_naming_the_file(tmp_path, edit, message):
    from alignprop.platform.config import ConfigError
    from alignprop.platform.sweeps.resume import PLAN_FILE, read_plan

    cfg, spec, _ = _smoke(tmp_path)
    path = tmp_path / "ray" / "s" / PLAN_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        read_plan(f"{tmp_path}/ray", "s", spec, 4, cfg)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "accepted" in text and "\n" not in text, text


def test_a_plan_that_is_not_json_or_too_large_is_refused(tmp_path):
    from alignprop.platform.config import ConfigError
    from alignprop.platform.sweeps.resume import MAX_PLAN_BYTES, PLAN_FILE, read_plan

    cfg, spec, _ = _smoke(tmp_path)
    path = tmp_path / "ray" / "s" / PLAN_FILE
    for content, message in ((pickle.dumps({"a": 1}), "not valid JSON"), (b"[" * 100_000, "not valid JSON"),
                             (b" " * (MAX_PLAN_BYTES + 1), "larger than 16 MB")):
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            read_plan(f"{tmp_path}/ray", "s", spec, 4, cfg)


def test_the_cli_refuses_a_tampered_plan_in_one_line_before_ray_starts(tmp_path):
    import subprocess
    import sys

    from alignprop.platform.sweeps.resume import PLAN_FILE
    from conftest import subprocess_env

    _smoke(tmp_path)
    path = tmp_path / "ray" / "s" / PLAN_FILE
    data = json.loads(path.read_text())
    data["trials"][0]["params"]["truncation.k"] = 7
    path.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "alignprop.platform.cli", "tune", "--config", "tiny-cpu", "--space",
                           "tiny-smoke", "--num-samples", "4", "--name", "s", f"ray.storage_path={tmp_path}/ray",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alignprop: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"alignprop: error: {path}: trial ") and "truncation.k=7" in errors[0], errors[0]
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_a_pickle_planted_in_a_trial_checkpoint_is_refused_before_ray_starts(tmp_path):
    import ray

    from alignprop.platform.errors import UnsafeCheckpointError
    from alignprop.platform.sweeps.tune import run_sweep

    cfg, spec, trials = _smoke(tmp_path)
    cfg = load_config("tiny-cpu", [f"ray.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    checkpoint = tmp_path / "ray" / "s" / "trials" / f"s-{trials[2]['id']}" / "checkpoint_2026-11-26_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 1}')
    marker = tmp_path / "ran"
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(_Payload(marker)))
    ray_was_up = ray.is_initialized()  # other modules' tests may share a Ray: the refusal must not start one
    with pytest.raises(UnsafeCheckpointError, match="optimizer.pt"):
        run_sweep(cfg, spec, num_samples=4, max_concurrent=1, sweep_name="s")
    assert ray.is_initialized() == ray_was_up and not marker.exists()
    assert not (tmp_path / "ray" / "s" / "tune").exists(), "no Tune experiment was started"
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name(cfg.name) is None, "no parent run"


# ------------------------------------------------------------------------------------ ASHA, seeded
def test_seeded_asha_judges_new_trials_against_the_sweeps_past_and_no_trial_twice_at_a_rung():
    """Rungs at steps 1, 2, 4 (grace 1, factor 2, max 8). Three earlier trials scored 1, 2, 3 at every
    step; a fresh ASHA would let a new trial scoring 1.5 pass step 1 (nothing recorded yet), the
    seeded one stops it (below the rung's median 2). A resumed trial that scored 0.5 at steps 1-2 is not
    judged again at those rungs when it reports step 3, and is judged at step 4."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from alignprop.platform.sweeps.resume import TRIAL_KEY
    from alignprop.platform.sweeps.tune import _scheduler

    spec = load_space("tiny-smoke", load_config("tiny-cpu"))
    prior = {f"p{v}": [(step, float(v)) for step in range(1, 9)] for v in (1, 2, 3)}
    resumed = {"r": [(1, 0.5), (2, 0.5)]}

    def scheduler(prior, resumed):
        s = _scheduler(spec, 8, prior, resumed)
        s.set_search_properties(spec.metric, "max")
        return s

    def result(step, value):
        return {"step": step, spec.metric: value}

    fresh, seeded = scheduler({}, {}), scheduler(prior, resumed)
    for s in (fresh, seeded):
        s.on_trial_add(None, Trial("run_trial", config={}, trial_id="new", stub=True))
    new = Trial("run_trial", config={}, trial_id="new", stub=True)
    assert fresh.on_trial_result(None, new, result(1, 1.5)) == TrialScheduler.CONTINUE
    assert seeded.on_trial_result(None, new, result(1, 1.5)) == TrialScheduler.STOP

    again = Trial("run_trial", config={TRIAL_KEY: "r"}, trial_id="tune-id-of-r", stub=True)
    seeded.on_trial_add(None, again)
    assert seeded.on_trial_result(None, again, result(3, 0.5)) == TrialScheduler.CONTINUE, "rungs 1, 2 already passed"
    assert seeded.on_trial_result(None, again, result(4, 0.5)) == TrialScheduler.STOP, "judged at the step-4 rung"


def test_optuna_is_told_the_sweeps_results_and_still_samples_the_space():
    from alignprop.platform.sweeps.resume import in_domain
    from alignprop.platform.sweeps.space import tune_domain
    from alignprop.platform.sweeps.tune import _search

    spec = load_space("reward_weights", load_config("sd15-aesthetic+hps", paths=False))  # search: optuna
    points = [{key: (d["lower"] + d["upper"]) / 2 for key, d in spec.space.items()} for _ in range(2)]
    searcher = _search(spec, (points, [0.25, 0.5]))
    assert searcher.set_search_properties(spec.metric, spec.mode, {k: tune_domain(d) for k, d in spec.space.items()})
    suggested = searcher.suggest("t0")
    assert set(suggested) == set(spec.space) and all(in_domain(v, spec.space[k]) for k, v in suggested.items())
