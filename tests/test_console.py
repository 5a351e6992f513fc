"""A clean console: the known noise of the stack is dropped (and nothing else), and `alignprop
train` ends with a summary that names the held-out rewards before → after, the LoRA and the UI."""

from __future__ import annotations

import logging
import warnings

import pytest

from alignprop.platform.console import filter_ray_worker_logs, is_noise, quiet_known_noise
from alignprop.platform.launch.summary import closing_summary, ui_hint

# Lines a tiny-cpu demo printed before (2026-11-26), verbatim.
MEASURED_NOISE = [
    "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
    "for backward compatibility. Install torchvision to use the default backend, or import `CLIPImageProcessorPil` "
    "directly to silence this warning.",
    "[2026-11-26 11:53:24,779] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
    "If you have GPU or other accelerator, we were unable to detect it.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "[2026-11-26 11:53:14,960 E 25227 25287] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'13e8fe6104e1f19eb7fbbc1301000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "Requesting resources: {'CPU': 0.49} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 0.49}] * 2",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/con/ray_results/x/checkpoint_1)",
    "WARNING: 8 PYTHON worker processes have been started on node: 7589 with address: 127.0.0.1, which is 4x the "
    "maximum expected startup concurrency (2). This could be a result of using a large number of actors.",
    "A run snapshot was found in storage folder at: '/tmp/con/ray_results/tiny-cpu-02f14d19'",
    "This snapshot contains a list of checkpoints reported via `ray.train.report` and will be loaded.",
    "If you meant to start a brand new training job without any information about previous checkpoints found in "
    "this directory, please configure a new, unique `RunConfig(name)` or delete the existing folder.",
    "\r",
]
REAL = [
    "UserWarning: The given NumPy array is not writable",
    "[2026-11-26 11:53:24,779] [WARNING] [engine.py:1] gradient overflow, skipping step",
    "Started training worker group of size 2: ",
    "alignprop: error: truncation.k: got 99; accepted: 1 <= k <= sampling.num_steps (10)",
    "ConnectionError: Found multiple active Ray instances",
]


@pytest.mark.parametrize("line", MEASURED_NOISE)
def test_known_noise_is_dropped(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", REAL)
def test_real_messages_are_kept(line):
    assert not is_noise(line)


def test_filters_act_where_the_noise_is_raised(caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    assert sum(type(f).__name__ == "_DropKnownNoise" for f in logging.getLogger("DeepSpeed").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we "
                                               "were unable to detect it.")
        logging.getLogger("DeepSpeed").warning("gradient overflow, skipping step")
    assert [r.getMessage() for r in caplog.records] == ["gradient overflow, skipping step"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest's own FutureWarning filter
        quiet_known_noise()  # placed before it
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("a real deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["a real deprecation"]


def test_ray_log_filter_drops_noise_lines_and_keeps_the_rest():
    from ray._private import worker as ray_worker

    dispatcher, printed = ray_worker.global_worker_stdstream_dispatcher, []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))
    try:
        filter_ray_worker_logs()
        filter_ray_worker_logs()  # wraps once
        dispatcher.emit({"lines": MEASURED_NOISE + REAL[:2], "pid": 1, "is_err": True})
        dispatcher.emit({"lines": MEASURED_NOISE[:2], "pid": 1, "is_err": True})
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert printed == [REAL[:2]]
    assert getattr(ray_worker.print_to_stdstream, "_alignprop", False), "the raylet's warnings are filtered too"


def test_closing_summary_names_rewards_before_after_lora_and_ui(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    run_id = run.info.run_id
    for step, value in ((0, 0.5), (2, 0.55), (4, 0.6)):
        client.log_metric(run_id, "eval/brightness", value, step=step)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter.json").write_text("{}")
    client.log_artifacts(run_id, str(tmp_path / "lora"), "lora/final")
    outcome = SimpleNamespace(run_name="demo", mlflow_run_id=run_id, tracking_uri=uri,
                              checkpoint_path="/ckpt/checkpoint_4",
                              metrics={"step": 4})
    text = "\n".join(closing_summary(outcome, f"runs:/{run_id}/model", "demo-model v1"))
    assert "run demo, 4 steps" in text
    assert "brightness 0.5000 → 0.6000 (+0.1000)" in text and "step 0 → 4" in text
    assert f"LoRA: runs:/{run_id}/lora/final" in text and f"runs:/{run_id}/model" in text and "demo-model v1" in text
    assert "[alignprop] last checkpoint: /ckpt/checkpoint_4" in text
    assert f"alignprop ui --tracking-uri {uri}" in text
    assert f"#/experiments/{run.info.experiment_id}/runs/{run_id}" in text


def test_closing_summary_sets_the_proxy_beside_the_gold_and_its_best_step(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from alignprop.platform.config import load_config

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    for step, proxy, gold in ((0, -1.6, -1.5), (10, -1.0, -0.9), (20, -0.4, -1.3)):  # hacked after step 10
        client.log_metric(run_id, "eval/toy_count", proxy, step=step)
        client.log_metric(run_id, "eval/toy_count_judge", gold, step=step)
        client.log_metric(run_id, "eval/toy_count_judge_se", 0.1, step=step)
    outcome = SimpleNamespace(run_name="demo", mlflow_run_id=run_id, tracking_uri=uri, checkpoint_path="/ckpt",
                              metrics={"step": 20})
    lines = closing_summary(outcome, cfg=load_config("toy-count", paths=False))
    assert ("  proxy vs gold: toy_count -1.6000 → -0.4000 (trained) | toy_count_judge -1.5000 → -1.3000 (gold; its "
            "best -0.9000 at step 10: lora/best)") in lines, lines
    assert not any("toy_count_judge_se" in line for line in lines), "standard errors stay in MLflow"


def test_the_summary_says_the_task_and_the_toy_worlds_count_task_why_captions_differ():
    from alignprop.platform.config import load_config
    from alignprop.platform.launch.summary import task_line

    assert task_line(load_config("tiny-cpu", paths=False)).startswith("  task: maximise 1 × brightness")
    line = task_line(load_config("toy-count", paths=False))
    assert line.startswith("  task: maximise 1 × toy_count (target 1); judged by toy_count_exact (target 1), "
                           "toy_count_judge (target 1), toy_color_match, toy_shape_match, toy_background_match; "
                           "lora/best is chosen on eval/toy_count_judge. Draw 1 object whatever the caption says"), line
    assert "Draw 3 objects" in task_line(load_config("toy-count", ["rewards.toy_count.target=3"], paths=False))


def test_ui_hint_points_at_make_ui_for_the_repo_db_and_at_a_server_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Makefile").write_text("ui:\n")
    assert ui_hint(f"sqlite:///{tmp_path}/mlflow.db", "1", "abc").startswith("make ui, then http://127.0.0.1:5000/")
    assert ui_hint("http://10.0.0.2:5000/", "3", "abc") == "http://10.0.0.2:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_a_first_run_says_in_one_line_why_the_first_step_waits_for_deepspeeds_op_build(tmp_path, monkeypatch):
    import torch

    from alignprop.platform.launch.session import op_build_notice

    if torch.cuda.is_available():
        pytest.skip("the CPU communication op is built only without a GPU")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert op_build_notice() == (f"[alignprop] first run with {tmp_path}: DeepSpeed compiles its CPU communication "
                                 "op before the first step (about 1-2 min of silence, once)")
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert op_build_notice() is None


def test_a_build_lock_left_by_a_killed_op_build_is_refused_in_one_line(tmp_path, monkeypatch):
    """Killing a run while DeepSpeed compiles its op leaves torch's `lock`; the next run's workers would
    wait on it forever in silence (measured: a sweep stalled 20 min)."""
    import os
    import time

    from alignprop.platform.config import ConfigError
    from alignprop.platform.launch.session import STALE_BUILD_LOCK_S, check_op_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_bytes(b"")
    check_op_build_lock()  # a build in progress: left alone
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(ConfigError) as err:
        check_op_build_lock()
    assert str(err.value) == (f"TORCH_EXTENSIONS_DIR: {lock} is left by an interrupted DeepSpeed op build (11 min "
                              f"old) and would stall the workers; accepted: remove it (rm {lock}) and rerun")



def test_rays_safe_to_ignore_timeout_goes_with_its_traceback_and_the_next_line_stays():
    from alignprop.platform.console import NoiseFilter

    drop = NoiseFilter()
    warning = ("Failed to send resource request for a1b2. If this only happens transiently during network partition "
               "or CPU being overloaded, it's safe to ignore this error. If this error persists, file a GitHub issue.")
    first = ["[alignprop] step 1/4", warning, "Traceback (most recent call last):",
             '  File "/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58']
    second = ["    ray.get(", "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
              "Detected that the Ray Train controller actor (8ebcabad02) is dead. Cleaning up placement group = [x]",
              "[alignprop] step 2/4", "Traceback (most recent call last):"]
    assert drop(first, 7) == ["[alignprop] step 1/4"]
    assert drop(second, 7) == ["[alignprop] step 2/4", "Traceback (most recent call last):"], "others' tracebacks stay"
    assert drop(['  File "x.py", line 1'], 8) == ['  File "x.py", line 1'], "per process"
