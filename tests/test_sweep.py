"""A real sweep: Ray Tune (ASHA) over Ray Train trials on the tiny preset, tracked by an `mlflow
server` on 127.0.0.1 that this module starts; checked through MLflow's REST API."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from alignprop.platform.config import load_config
from alignprop.platform.sweeps.space import load_space
from conftest import VENV_BIN, free_port, subprocess_env

pytestmark = pytest.mark.slow
LRS = [0.1, 0.03, 1e-3, 1e-5]  # best first: later trials fall below the rung median and ASHA stops them


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        env=subprocess_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)  # polling readiness
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


def rest(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def sweep_config(tmp_path, url, experiment, *overrides):
    return load_config("tiny-cpu", [
        "ray.num_workers=1", "ray.resources_per_worker={CPU: 0.98}", "trainer.max_steps=3", "trainer.eval_every=1",
        "trainer.ckpt_every=3", f"ray.storage_path={tmp_path}/ray", f"tracking.uri={url}",
        f"tracking.experiment={experiment}",
        *overrides,
    ])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_server, local_ray):
    from alignprop.platform.sweeps.tune import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    space = tmp / "lr.yaml"
    space.write_text(f"metric: eval/reward_total\nmode: max\nscheduler: asha\nspace:\n"
                     f"  optim.lr: {{space: grid_search, values: {LRS}}}\n")
    cfg = sweep_config(tmp, mlflow_server, "sweep")
    started, console = time.monotonic(), io.StringIO()
    with contextlib.redirect_stdout(console):  # what the driver prints, Ray's streamed worker lines included
        summary = run_sweep(cfg, load_space(str(space), cfg), num_samples=1, max_concurrent=2, sweep_name="lr-sweep",
                            register_as="tiny-alignprop")
    (tmp / "console.txt").write_text(console.getvalue())
    return summary, time.monotonic() - started, tmp


def test_parent_and_four_children_in_mlflow(sweep, mlflow_server):
    summary, seconds, _ = sweep
    print(f"sweep wall time {seconds:.0f} s, up to {summary['concurrency']} trials at once")
    found = rest(mlflow_server, "experiments/search", {"filter": "name = 'sweep'", "max_results": 10})["experiments"]
    assert len(found) == 1
    experiment = found[0]
    runs = rest(mlflow_server, "runs/search",
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
    children = [(r, t) for r, t in zip(runs, tags) if t.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents[0]["info"]["run_id"]
    assert all(t["mlflow.parentRunId"] == parent_id for _, t in children)
    lrs = sorted(float({p["key"]: p["value"] for p in r["data"]["params"]}["optim.lr"]) for r, _ in children)
    assert lrs == sorted(LRS)
    parent_params = {p["key"]: p["value"] for p in parents[0]["data"]["params"]}
    assert parent_params["sweep.metric"] == "eval/reward_total" and parent_params["sweep.scheduler"] == "asha"
    statuses = sorted(r["info"]["status"] for r, _ in children)
    assert "KILLED" in statuses, f"ASHA stopped no trial early: {statuses}"
    for run, tag in children:  # KILLED is the trials ASHA stopped short of max_steps, each at its own end time
        last_step = {m["key"]: m for m in run["data"]["metrics"]}["step"]
        if last_step["value"] >= 3:
            assert run["info"]["status"] == "FINISHED" and "alignprop.early_stopped" not in tag, (run["info"], tag)
        else:
            assert run["info"]["status"] == "KILLED" and tag["alignprop.early_stopped"] == "true", (run["info"], tag)
            assert int(run["info"]["end_time"]) == int(last_step["timestamp"]), "its own end, not the sweep's"
    best = next(r for r, t in children if t["alignprop.trial_id"] == summary["best"]["trial_id"])
    assert best["info"]["status"] == "FINISHED", best["info"]
    assert [r["status"] for r in summary["rows"]].count("stopped") >= 1
    parent_tags = {t["key"]: t["value"] for t in parents[0]["data"]["tags"]}
    assert parent_tags["alignprop.best_trial_id"] == summary["best"]["trial_id"]
    artifacts = urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/artifacts/list?run_id={parent_id}").read()
    listed = {f["path"] for f in json.loads(artifacts)["files"]}
    assert {"results.csv", "metric_vs_params.png", "best_config.yaml", "best_lora"} <= listed


def test_the_console_shows_each_trials_progress_labelled_by_the_trial_and_no_ray_noise(sweep):
    summary, _, tmp = sweep
    console = (tmp / "console.txt").read_text().splitlines()
    for row in summary["rows"]:  # 3 steps: a line for each step Tune received (a tenth of 3 rounds to 1)
        label = row["trial_id"]
        steps = [line for line in console if line.startswith(f"[trial {label}] step ")]
        closing = [line for line in console if line.startswith("[tune] ") and f" trial {label} " in line]
        assert len(closing) == 1, console
        received = int(closing[0].split(" after ")[1].split()[0])  # the trial's last result Tune processed
        assert [line.split()[3] for line in steps] == [f"{n}/3" for n in range(1, received + 1)], console
        # ASHA stops a trial on a result while its worker may already have logged later steps to MLflow
        assert 1 <= received <= int(row["steps"]), (row, closing)
    assert not [line for line in console if "pid=" in line and " step " in line], "a worker printed progress"
    noise = ("PlacementGroupCleaner", "repeated", "GetTimeoutError", "tensorboard", "safe to ignore")
    assert not [line for line in console if any(n in line for n in noise)], console


def test_the_closing_summary_names_the_best_trial_its_lora_model_and_the_ui(sweep, mlflow_server):
    from mlflow import MlflowClient

    from alignprop.platform.sweeps.summary import closing_lines

    summary, _, tmp = sweep
    spec = load_space(str(tmp / "lr.yaml"), sweep_config(tmp, mlflow_server, "sweep"))
    lines = closing_lines(summary, spec)
    parent_id, best = summary["parent_run_id"], summary["best"]
    tags = MlflowClient(mlflow_server).get_run(parent_id).data.tags
    child, registered = tags["alignprop.best_run_id"], tags["alignprop.registered"]
    counts = {s: sum(r["status"] == s for r in summary["rows"]) for s in ("complete", "stopped")}
    assert lines[0].startswith(f"[tune] done: sweep lr-sweep, 4 trials ({counts['complete']} complete, "
                               f"{counts['stopped']} stopped), parent run {parent_id} at {mlflow_server}"), lines
    assert lines[1] == (f"  best: trial {best['trial_id']} (optim.lr={best['optim.lr']}): eval/reward_total "
                        f"{best['eval/reward_total']:.5g} after 3 steps"), lines
    assert registered.startswith("models:/tiny-alignprop/")
    assert lines[2] == (f"  LoRA: runs:/{parent_id}/best_lora (from run {child})   MLflow Model: runs:/{child}/model "
                        f"(registered: {registered})"), lines
    assert lines[3].startswith(f"  UI: {mlflow_server}") and f"/runs/{parent_id}" in lines[3], lines


def test_best_lora_loads_and_is_registered(sweep, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from alignprop.platform.models import build_tiny_pipeline

    summary, _, _ = sweep
    client = MlflowClient(mlflow_server)
    local = client.download_artifacts(summary["parent_run_id"], "best_lora", str(tmp_path))
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(local)
    # --register: the best trial's MLflow Model (runs:/<child>/model), alias best, loads as a pyfunc.
    import mlflow
    import pandas as pd

    from alignprop.platform.mlflow_model import mlflow_uris

    best_child = client.get_run(summary["parent_run_id"]).data.tags["alignprop.best_run_id"]
    assert client.get_model_version_by_alias("tiny-alignprop", "best").run_id == best_child
    with mlflow_uris(mlflow_server):
        model = mlflow.pyfunc.load_model("models:/tiny-alignprop@best")
    assert len(model.predict(pd.DataFrame({"prompt": ["a cat"]}))) == 1


def test_no_cpu_reservation_is_left_behind(sweep, local_ray):
    ray = local_ray
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # Ray frees placement groups asynchronously: poll, bounded
    assert ray.available_resources().get("CPU", 0) == 2

    @ray.remote(num_cpus=2)
    def whole_machine():
        return "ran"

    assert ray.get(whole_machine.remote(), timeout=30) == "ran"


def test_a_failing_trial_does_not_stop_the_sweep(sweep, mlflow_server, local_ray):
    from alignprop.platform.sweeps.tune import run_sweep

    _, _, tmp = sweep
    space = tmp / "fail.yaml"
    space.write_text("scheduler: none\nspace:\n  trainer.fail_at_step: {space: grid_search, values: [1, null]}\n")
    cfg = sweep_config(tmp, mlflow_server, "failing", "trainer.max_steps=1")
    summary = run_sweep(cfg, load_space(str(space), cfg), num_samples=1, max_concurrent=2, sweep_name="fail-sweep")
    statuses = sorted(r["status"] for r in summary["rows"])
    assert statuses == ["complete", "error"], summary["rows"]


def test_rerunning_a_sweep_with_the_same_name_resumes_it(sweep, mlflow_server, local_ray):
    from mlflow import MlflowClient

    from alignprop.platform.sweeps.tune import run_sweep

    summary, _, tmp = sweep
    cfg = sweep_config(tmp, mlflow_server, "sweep")
    again = run_sweep(cfg, load_space(str(tmp / "lr.yaml"), cfg), num_samples=1, max_concurrent=2,
                      sweep_name="lr-sweep")
    assert again["parent_run_id"] == summary["parent_run_id"]
    assert sorted(r["trial_id"] for r in again["rows"]) == sorted(r["trial_id"] for r in summary["rows"])
    client = MlflowClient(mlflow_server)
    children = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(children) == 4, "no trial ran again"


def test_a_two_trial_comparison_sweep_puts_the_figure_and_table_in_the_parent_run(
    sweep, mlflow_server, local_ray, tmp_path):
    """A grid over trainer.algorithm: the parent run gets reward vs images_seen / wall_s per method
    and the images-to-reach table against DDPO (the baseline when the grid has it)."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    from alignprop.platform.sweeps.tune import run_sweep

    _, _, tmp = sweep
    space = tmp / "compare.yaml"
    space.write_text("metric: eval/reward_total\nmode: max\nscheduler: none\nspace:\n"
                     "  trainer.algorithm: {space: grid_search, values: [alignprop, ddpo]}\n"
                     "  trainer.seed: {space: grid_search, values: [0]}\n")
    cfg = sweep_config(tmp, mlflow_server, "compare", "trainer.max_steps=2", "sampling.num_steps=4", "truncation.k=2")
    summary = run_sweep(cfg, load_space(str(space), cfg), num_samples=1, max_concurrent=2, sweep_name="compare-sweep")
    efficiency = summary["sample_efficiency"]
    assert efficiency["baseline"] == "algorithm=ddpo"
    assert efficiency["groups"] == ["algorithm=alignprop", "algorithm=ddpo"]
    by_method = {r["method"]: r for r in efficiency["rows"]}
    ddpo = by_method["algorithm=ddpo"]
    assert ddpo["images_to_reach"] <= 4 and (ddpo["images_vs_baseline"] == 1.0 or ddpo["images_to_reach"] == 0)
    assert all(r["seeds"] == 1 for r in efficiency["rows"])
    client = MlflowClient(mlflow_server)
    names = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"sample_efficiency.png", "sample_efficiency.csv", "sample_efficiency.md"} <= names
    table = mlflow.artifacts.download_artifacts(run_id=summary["parent_run_id"], artifact_path="sample_efficiency.md",
                                                dst_path=str(tmp_path), tracking_uri=mlflow_server)
    text = open(table).read()
    assert "| algorithm=alignprop | 1 |" in text and "images to reach" in text
    for child in client.search_runs([client.get_experiment_by_name("compare").experiment_id]):
        if child.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]:
            history = [m.value for m in client.get_metric_history(child.info.run_id, "images_seen")]
            assert history == [2.0, 4.0], history  # batch 2 × 1 worker per step: the common x-axis
