"""The real CLI, end to end: `alignprop train --config tiny-cpu` through Ray Train (2 workers,
DeepSpeed ZeRO-2), MLflow in sqlite; then the same run name again resumes where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env

pytestmark = pytest.mark.slow


def alignprop(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "alignprop.platform.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two CLI runs with one run name: 2 steps on 2 workers, then extended to 4 on 1 worker (resume
    with another world size: the checkpoint holds the full, unpartitioned ZeRO state)."""
    work = tmp_path_factory.mktemp("e2e")
    common = ["train", "--config", "tiny-cpu", "--run-name", "e2e", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
              f"ray.storage_path={work}/ray", "trainer.ckpt_every=2", "trainer.eval_every=2"]
    first = alignprop(*common, "trainer.max_steps=2", cwd=work)
    second = alignprop(*common, "trainer.max_steps=4", "ray.num_workers=1", "ray.resources_per_worker={CPU: 0.98}",
                       "--register", "e2e-model", cwd=work)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny-cpu").experiment_id])
    return work, client, runs, first, second


def test_mlflow_run_has_params_metrics_images_and_lora(trained):
    work, client, runs, _, _ = trained
    assert len(runs) == 1, "the rerun logs into the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert run.data.params["optim.lr"] == "0.03" and run.data.params["ray.num_workers"] == "2"
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["rewards.brightness.weight"] == "1.0"
    assert run.data.params["algorithm"] == "alignprop" and not [k for k in run.data.params if k.startswith("ddpo.")]
    for key in ("loss", "reward/total_mean", "reward/brightness_mean", "grad_norm", "k", "images_per_s", "step_time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
    assert {"eval/reward_total", "eval/saturation", "eval/colorfulness"} <= run.data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "lora", "eval"} <= artifacts, artifacts
    grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval/samples"))
    assert grids == [f"eval/samples/step_{n:04d}.png" for n in (0, 2, 4)], grids
    assert len(run.inputs.dataset_inputs) == 2, "the prompt sets, once across the rerun"
    assert {"mlflow.user", "mlflow.source.name", "alignprop.command"} <= run.data.tags.keys()
    lora = {a.path for a in client.list_artifacts(run.info.run_id, "lora")}
    assert lora == {"lora/final", "lora/best"}


def test_lora_artifact_loads_into_the_pipeline_and_changes_it(trained):
    work, client, runs, _, _ = trained
    from alignprop.platform.models import build_tiny_pipeline
    from alignprop.platform.sample import resolve_lora

    lora_dir = resolve_lora(f"runs:/{runs[0].info.run_id}/lora/final", f"sqlite:///{work}/mlflow.db")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = build_tiny_pipeline()

    def render():
        out = pipe("a photo of a cat", num_inference_steps=4, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(0))
        return out.images

    base = render()
    pipe.load_lora_weights(str(lora_dir))
    assert (render() - base).abs().max() > 1e-4


def test_each_run_logs_an_mlflow_model_and_register_names_the_last_best(trained, tmp_path):
    """Both CLI runs logged the run's Model (steps 2 and 4); `--register` made models:/e2e-model@best
    the newest, which holds lora/final and predicts images."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from alignprop.platform.mlflow_model import decode_image, mlflow_uris

    work, client, runs, _, _ = trained
    uri, run_id = f"sqlite:///{work}/mlflow.db", runs[0].info.run_id
    outputs = sorted((o.step, o.model_id) for o in client.get_run(run_id).outputs.model_outputs)
    assert [step for step, _ in outputs] == [2, 4]
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("e2e-model", "best")
    assert version.source == f"models:/{outputs[-1][1]}" and version.run_id == run_id
    with mlflow_uris(uri):
        model = mlflow.pyfunc.load_model("models:/e2e-model@best")
        held = mlflow.artifacts.download_artifacts("models:/e2e-model@best", dst_path=str(tmp_path / "model"))
        final = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/lora/final", dst_path=str(tmp_path / "final"))
    name = "pytorch_lora_weights.safetensors"
    assert (Path(held) / "artifacts" / "lora" / name).read_bytes() == (Path(final) / name).read_bytes()
    out = model.predict(pd.DataFrame({"prompt": ["a photo of a cat"]}))
    assert decode_image(out.image[0]).size == (32, 32)


def test_rerun_with_the_same_name_resumed_from_the_checkpoint(trained):
    work, client, runs, first, second = trained
    last = Path(second.stdout.split("[alignprop] last checkpoint: ")[1].split()[0])
    assert last.parent == work / "ray" / "e2e"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4
    files = {p.name for p in last.rglob("*") if p.is_file()}
    assert {"optimizer.safetensors", "engine_state.json", "pytorch_lora_weights.safetensors"} <= files, files
    assert all(name.endswith((".safetensors", ".json")) for name in files), "no pickles in a checkpoint"
    assert "resumed at step 2 of 4" in second.stdout + second.stderr
    assert json.loads((last / "engine_state.json").read_text())["world_size"] == 1, "resumed a 2-worker run on 1 worker"
    # The second run reported steps 3 and 4 only: every metric has exactly one point per step.
    history = client.get_metric_history(runs[0].info.run_id, "step")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


def test_sample_cli_writes_base_and_lora_images(trained, tmp_path):
    work, _, runs, _, _ = trained
    alignprop("sample", "--config", "tiny-cpu", "--lora", f"runs:/{runs[0].info.run_id}/lora/final",
              "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--prompt", "a cat", "--prompt", "a dog",
              "--out", str(tmp_path / "png"), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["base_00.png", "base_01.png", "lora_00.png",
                                                                    "lora_01.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["png"], "sample writes nothing but its outputs (no ./mlflow.db)"


def test_console_is_clean_and_ends_with_a_summary(trained):
    """No warning walls (the stack's known noise is filtered where raised), and the closing summary."""
    _, _, runs, first, second = trained
    for proc in (first, second):
        text = proc.stdout + proc.stderr
        markers = ("Warning", "WARNING", "Traceback", "Error")
        noisy = [line for line in text.splitlines() if any(w in line for w in markers)]
        assert not noisy, noisy
    assert "held-out rewards (eval/, step 0 → 4): brightness " in second.stdout
    grids = "eval/samples/step_0000.png → eval/samples/step_0004.png"
    assert f"samples: runs:/{runs[0].info.run_id}/{grids}" in second.stdout
    assert f"LoRA: runs:/{runs[0].info.run_id}/lora/final" in second.stdout
    assert "alignprop ui --tracking-uri sqlite:///" in second.stdout


def test_runs_show_reprints_the_closing_summary_from_mlflow(trained):
    work, _, runs, _, second = trained
    summary = second.stdout[second.stdout.index("[alignprop] done: "):].strip().splitlines()
    shown = alignprop("runs", "show", "e2e", "--tracking-uri", f"sqlite:///{work}/mlflow.db", cwd=work)
    assert shown.stdout.splitlines()[0].startswith("[alignprop] run e2e: FINISHED, ended 20")
    assert shown.stdout.splitlines()[1:] == summary, (shown.stdout, summary)
    by_id = alignprop("runs", "show", runs[0].info.run_id, "--tracking-uri", f"sqlite:///{work}/mlflow.db", cwd=work)
    assert by_id.stdout == shown.stdout
