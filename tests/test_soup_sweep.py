"""`alignprop soup --sweep`: α sweep of the paper's adapter interpolation on the tiny pipeline, with
`base` (the zero adapter) as one side, logged to a new MLflow run."""

from __future__ import annotations

import csv

import pytest
import torch

from alignprop.platform.cli import main
from alignprop.platform.config import load_config
from alignprop.platform.models import load_pipeline
from alignprop.platform.soup.mix import read_adapters
from alignprop.platform.soup.alpha_scan import SWEEP_ACCEPTED, parse_sweep, render, sweep_images
from test_soup import trained_adapter

FAST = ["sampling.num_steps=2", "truncation.k=2"]


def test_parse_sweep_includes_both_ends():
    assert parse_sweep("0:1:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_sweep("0:1:0.3") == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert parse_sweep("0.25:0.75:0.25") == [0.25, 0.5, 0.75]
    assert parse_sweep("0:0.5:2") == [0.0, 0.5]


@pytest.mark.parametrize("mode", ["params", "delta"])
def test_base_side_gives_the_base_images_at_alpha_0_and_the_adapters_at_alpha_1(tmp_path, mode):
    cfg = load_config("tiny-cpu", FAST, paths=False)
    prompts = list(cfg.trainer.eval_prompts)[:2]
    adapter = trained_adapter(tmp_path, "a", 0, rank=2, alpha=4)
    pipe = load_pipeline(cfg.model)
    base = render(pipe, cfg, prompts, seed=7)  # the pipeline that never saw a LoRA
    pipe.load_lora_weights(str(adapter))
    tuned = render(pipe, cfg, prompts, seed=7)
    pipe.unload_lora_weights()
    assert (tuned - base).abs().max() > 1e-3
    images = {alpha: x for _, alpha, x in sweep_images(pipe, cfg, read_adapters([str(adapter), "base"]),
                                                        [0.0, 0.5, 1.0], mode, prompts, seed=7, progress=False)}
    assert torch.equal(images[0.0], base)  # bitwise: the zero adapter adds exactly nothing
    if mode == "params":
        assert torch.equal(images[1.0], tuned)  # 1·θ + 0·0 is θ bit for bit
    else:
        torch.testing.assert_close(images[1.0], tuned, rtol=1e-4, atol=1e-5)  # scale folded into B
    assert (images[0.5] - base).abs().max() > 1e-4 and (images[0.5] - tuned).abs().max() > 1e-4
    assert torch.equal(render(pipe, cfg, prompts, seed=7), base)  # unloading restored the base model exactly


def test_sweep_logs_one_new_mlflow_run_per_sweep(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    a = trained_adapter(tmp_path, "a", 0, rank=2, alpha=4)
    b = trained_adapter(tmp_path, "b", 1, rank=2, alpha=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "sweep"
    argv = ["soup", "--sweep", "0:1:0.5", "--lora", str(a), "--lora", str(b), "--config", "tiny-cpu", *FAST,
            "--prompt", "a photo of a cat", "--prompt", "a photo of a bee", "--tracking-uri", uri,
            "--experiment", "soups", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    labels = ["brightness", "saturation", "colorfulness"]  # tiny-cpu: rewards, then eval_rewards
    assert printed[0].split() == ["alpha", *labels] and [line.split()[0] for line in printed[1:4]] == ["0", "0.5", "1"]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("soups")
    [run] = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["lora_1"] == str(a) and run.data.params["lora_2"] == str(b)
    assert run.data.params["mode"] == "params" and run.data.params["alphas"] == "0,0.5,1"
    alpha = client.get_metric_history(run_id, "soup/alpha")
    assert sorted((m.step, m.value) for m in alpha) == [(0, 0.0), (1, 0.5), (2, 1.0)]
    with open(out / "soup_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.5, 1.0] and list(rows[0]) == ["alpha", *labels]
    for label in labels:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"soup/{label}"))
        assert [s for s, _ in history] == [0, 1, 2]
        assert [v for _, v in history] == pytest.approx([float(r[label]) for r in rows])
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"soup_sweep.csv", "reward_vs_reward.png", "samples", "config.yaml"} <= artifacts
    grids = sorted(f.path for f in client.list_artifacts(run_id, "samples"))
    assert grids == ["samples/alpha_0.0000.png", "samples/alpha_0.5000.png", "samples/alpha_1.0000.png"]
    with Image.open(out / "reward_vs_reward.png") as png:
        assert png.size[0] > 100
    with Image.open(out / "samples" / "alpha_0.5000.png") as grid:
        assert grid.size == (2 * 32, 32)  # two prompts side by side at sampling.resolution

    # a second sweep: a new run (one reward: reward vs α), base on one side, delta mode
    argv2 = ["soup", "--sweep", "0:1:1", "--lora", "base", "--lora", str(a), "--mode", "delta", "--config", "tiny-cpu",
             *FAST, "eval_rewards=[]", "--prompt", "a photo of a cat", "--tracking-uri", uri, "--experiment", "soups",
             "--out", str(tmp_path / "sweep2")]
    assert main(argv2) == 0
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    second = next(r for r in runs if r.info.run_id != run_id)
    assert second.data.params["lora_1"] == "base" and second.data.params["mode"] == "delta"
    assert set(second.data.metrics) == {"soup/alpha", "soup/brightness"}
    assert (tmp_path / "sweep2" / "reward_vs_reward.png").is_file()


@pytest.mark.parametrize("spec", ["x", "0:1", "0:1:0.1:2", "1:0:0.1", "0.5:0.5:0.1", "0:1:0", "0:1:-0.1",
                                  "-0.1:1:0.1", "0:1.5:0.5", "nan:1:0.1", "0:inf:0.1", "0:1:nan", "a:b:c"])
def test_malformed_sweep_is_one_line_and_exit_2_before_anything_loads(tmp_path, capsys, spec):
    db, out = tmp_path / "mlflow.db", tmp_path / "out"
    rc = main(["soup", f"--sweep={spec}", "--lora", str(tmp_path / "missing"), "--lora", "base", "--config", "tiny-cpu",
               "--tracking-uri", f"sqlite:///{db}", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err == f"alignprop: error: --sweep: got {spec!r}; accepted: {SWEEP_ACCEPTED}"
    assert not db.exists() and not out.exists()


@pytest.mark.parametrize("argv, field", [
    (["--sweep", "0:1:0.5", "--lora", "A", "--config", "tiny-cpu"], "--lora"),
    (["--sweep", "0:1:0.5", "--lora", "A", "--lora", "B", "--lora", "C", "--config", "tiny-cpu"], "--lora"),
    (["--sweep", "0:1:0.5", "--lora", "base", "--lora", "base", "--config", "tiny-cpu"], "--lora"),
    (["--sweep", "0:1:0.5", "--lora", "A", "--lora", "B", "--weights", "0.5", "0.5", "--config", "tiny-cpu"],
     "--weights"),
    (["--sweep", "0:1:0.5", "--lora", "A", "--lora", "B"], "--config"),
    (["--lora", "A", "--lora", "B"], "--weights"),
    (["--lora", "A", "--lora", "B", "--weights", "0.5", "0.5", "--config", "tiny-cpu"], "--config"),
    (["--sweep", "0:1:0.5", "--lora", "A", "--lora", "base", "--config", "tiny-cpu"], "--lora"),  # A does not exist
], ids=["one-lora", "three-loras", "both-base", "weights-with-sweep", "no-config", "no-weights", "config-without-sweep",
        "missing-lora"])
def test_soup_argument_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, field):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    rc = main(["soup", *argv, "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith(f"alignprop: error: {field}: "), err
    assert not db.exists() and not (tmp_path / "out").exists()


def test_params_sweep_of_different_ranks_fails_before_the_pipeline_or_the_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = trained_adapter(tmp_path, "a", 0, rank=2, alpha=2)
    b = trained_adapter(tmp_path, "b", 1, rank=4, alpha=2)
    db = tmp_path / "mlflow.db"
    rc = main(["soup", "--sweep", "0:1:0.5", "--lora", str(a), "--lora", str(b), "--config", "tiny-cpu",
               "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("alignprop: error: --mode params: ") and "\n" not in err
    assert not db.exists() and not (tmp_path / "out").exists()
