"""Bad inputs to `alignprop soup/sample/bench` are one `alignprop: error:` line (exit 2) naming the
option and what it accepts, raised before Ray, a model, or any file in the working directory."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from alignprop.platform.config import ConfigError, load_config
from conftest import subprocess_env
from test_soup import fake_adapter, pickled_lora

MISSING_RUN = "runs:/0123456789abcdef0123456789abcdef/lora/final"


def run_cli(args, cwd):
    """`alignprop ARGS` in this process (the same `main` as the console script, without a new
    interpreter per case); `test_bench_cli_refuses_zero_steps` runs the real command."""
    from alignprop.platform.cli import main

    stderr, stdout, here = io.StringIO(), io.StringIO(), os.getcwd()
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(list(args))
    finally:
        os.chdir(here)
        os.environ.update(saved)
    return SimpleNamespace(returncode=code, stderr=stderr.getvalue(), stdout=stdout.getvalue())


def run_real_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "alignprop.platform.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc, starts_with):
    """Exit 2, exactly one `alignprop: error:` line, no traceback; returns the message."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alignprop: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = errors[0][len("alignprop: error: "):]
    assert message.startswith(starts_with) and "accepted:" in message, message
    return message


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow sqlite store outside any test's cwd, with one run holding a LoRA registered as soupable/1."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cli-errors", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(fake_adapter(root / "lora")), "lora/final")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("soupable")
    client.create_model_version("soupable", f"{run.info.artifact_uri}/lora/final", run_id=run.info.run_id)
    return uri


@pytest.mark.parametrize("case", ["non-finite-weights", "text-file", "pickle-bin", "runs-uri-without-store"])
def test_soup_cli_bad_inputs(tmp_path, case):
    a, b = fake_adapter(tmp_path / "a"), fake_adapter(tmp_path / "b")
    (tmp_path / "notes.txt").write_text("not weights\n")
    marker = tmp_path / "unpickled"
    pickled_lora(tmp_path / "lora.bin", marker)
    loras, weights, starts = {
        "non-finite-weights": ([a, b], ["nan", "inf"], "--weights: got nan, inf; accepted: finite numbers"),
        "text-file": (["notes.txt", b], ["0.5", "0.5"],
                      "--lora: notes.txt is not a .safetensors file; accepted: a directory holding "
                      "pytorch_lora_weights.safetensors"),
        "pickle-bin": (["lora.bin", b], ["0.5", "0.5"],
                       "--lora: lora.bin is not a .safetensors file; accepted: a directory holding "
                       "pytorch_lora_weights.safetensors"),
        "runs-uri-without-store": ([MISSING_RUN, b], ["0.5", "0.5"],
                                   f"--tracking-uri: no MLflow store at {tmp_path / 'mlflow.db'}"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    flags = [x for lora in loras for x in ("--lora", str(lora))]
    proc = run_cli(["soup", *flags, "--weights", *weights, "--out", "mix"], tmp_path)
    assert_one_error_line(proc, starts)
    assert not marker.exists(), "a pickle was unpickled"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mix/, no mlflow.db


@pytest.mark.parametrize("lora, starts", [
    (MISSING_RUN, f"--lora: cannot resolve {MISSING_RUN} at tracking URI sqlite:///"),
    ("models:/nope/1", "--lora: cannot resolve models:/nope/1 at tracking URI sqlite:///"),
    ("notes.txt", "--lora: notes.txt is not a .safetensors file"),
], ids=["missing-run", "missing-model", "text-file"])
def test_sample_cli_bad_lora(tmp_path, store, lora, starts):
    (tmp_path / "notes.txt").write_text("not weights\n")
    proc = run_cli(["sample", "--config", "tiny-cpu", "--lora", lora, "--prompt", "a cat", "--out", "samples",
                    "--tracking-uri", store], tmp_path)
    message = assert_one_error_line(proc, starts)
    if "://" in lora or lora.startswith(("runs:/", "models:/")):
        assert store in message and "not found" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no ./mlflow.db, no samples/


def test_sample_resolves_models_uri_through_the_tracking_uri_as_registry(tmp_path, store, monkeypatch):
    import mlflow

    from alignprop.platform.sample import resolve_lora

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    before = mlflow.get_registry_uri(), mlflow.get_tracking_uri()
    path = resolve_lora("models:/soupable/1", store)
    assert (path / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ConfigError) as err:
        resolve_lora("models:/nope@best", store)
    message = str(err.value)
    assert "\n" not in message and "accepted:" in message, message
    assert message.startswith("--lora: cannot resolve models:/nope@best"), message
    assert list(tmp_path.iterdir()) == []  # the registry was the store, not ./mlflow.db
    assert (mlflow.get_registry_uri(), mlflow.get_tracking_uri()) == before  # global MLflow state restored


def test_bench_cli_refuses_zero_steps(tmp_path):
    proc = run_real_cli(["bench", "--config", "tiny-cpu", "--steps", "0"], tmp_path)
    assert assert_one_error_line(proc, "--steps: ") == "--steps: got 0; accepted: an integer >= 1"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps", [0, -3, True, 1.5])
def test_run_bench_checks_steps_before_starting_anything(steps, monkeypatch):
    from alignprop.platform.bench import steps as bench

    monkeypatch.setattr(bench, "_spawned", lambda *a: pytest.fail("a cell started"))
    monkeypatch.setattr(bench, "run_cells", lambda *a: pytest.fail("a cell started"))
    with pytest.raises(ConfigError) as err:
        bench.run_bench(load_config("tiny-cpu"), steps)
    assert str(err.value) == f"--steps: got {steps!r}; accepted: an integer >= 1"
