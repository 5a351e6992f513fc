"""An MLflow Model per run: `log_run_model` on a tiny-pipeline LoRA in a sqlite store (no training
run), loaded through runs:/ and models:/NAME@best, sampled by `alignprop sample`, and served by
`mlflow models serve`."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alignprop.platform.config import ConfigError, LoraSection, load_config, to_yaml
from alignprop.platform.mlflow_model import (MAX_ROWS, MAX_STEPS, decode_image, log_run_model, mlflow_uris,
                                             register_model)
from alignprop.platform.models import add_lora, build_tiny_pipeline, load_pipeline, save_lora
from conftest import REPO, VENV_BIN, free_port
from test_cli_errors import assert_one_error_line, run_cli

OVERRIDES = ["sampling.num_steps=4", "truncation.k=4"]  # tiny-cpu, 4 DDIM steps: fast and still a real pipeline
PROMPTS = ["a photo of a cat", "a photo of a dog"]


def render(pipe, prompt: str, seed: int, cfg) -> np.ndarray:
    """What `alignprop sample` and the Model's predict do for one prompt (uint8 H×W×3)."""
    s = cfg.sampling
    image = pipe(prompt, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta,
                 height=s.resolution, width=s.resolution,
                 generator=torch.Generator(device="cpu").manual_seed(seed)).images[0]
    return np.asarray(image)


def same_image(ours: np.ndarray, plain: np.ndarray) -> bool:
    """The Model folds the LoRA into the weights (`LoraFold`), plain diffusers runs peft's wrapped layers: the
    same math up to float rounding (≈1e-6 here), which can move a pixel across an 8-bit step, never further."""
    return ours.shape == plain.shape and int(np.abs(ours.astype(int) - plain.astype(int)).max()) <= 1


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run (sqlite store) holding a tiny-pipeline LoRA with nonzero B at lora/final and the run's
    config.yaml, and its Model logged from an empty cwd (which must stay empty)."""
    from mlflow import MlflowClient

    root, cwd = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("cwd")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tiny-cpu", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    cfg = load_config("tiny-cpu", OVERRIDES)
    pipe = build_tiny_pipeline()
    add_lora(pipe.unet, LoraSection(rank=cfg.lora.rank, alpha=cfg.lora.alpha))
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_lora(pipe.unet, root / "lora")
    client.log_artifacts(run_id, str(root / "lora"), "lora/final")
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    for step, value in enumerate([0.1, 0.4, 0.3]):
        client.log_metric(run_id, "eval/reward_total", value, step=step)
    client.log_metric(run_id, "train/loss", -0.5, step=2)
    import mlflow

    before, here = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
                    os.environ.get("MLFLOW_TRACKING_URI")), os.getcwd()
    os.chdir(cwd)
    try:
        started = time.monotonic()
        model_uri = log_run_model(uri, run_id)
        seconds = time.monotonic() - started
    finally:
        os.chdir(here)
    assert list(cwd.iterdir()) == [], "logging the Model wrote into the cwd"
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    client.set_terminated(run_id)
    print(f"\n[mlflow-model] log_run_model {seconds:.1f} s")
    return {"uri": uri, "client": client, "run_id": run_id, "model_uri": model_uri, "cfg": cfg, "root": root}


def predict(model_uri: str, uri: str, prompts=PROMPTS, **params) -> pd.DataFrame:
    import mlflow

    with mlflow_uris(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    return model.predict(pd.DataFrame({"prompt": prompts}), params=params or None)


def test_runs_uri_loads_a_pyfunc_whose_images_carry_the_lora(logged):
    assert logged["model_uri"] == f"runs:/{logged['run_id']}/model"
    out = predict(logged["model_uri"], logged["uri"])
    assert list(out.columns) == ["prompt", "seed", "image"] and list(out.prompt) == PROMPTS and list(out.seed) == [0, 1]
    images = [np.asarray(decode_image(x)) for x in out.image]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in images)
    cfg = logged["cfg"]
    base = load_pipeline(cfg.model)
    with_lora = load_pipeline(cfg.model)
    with_lora.load_lora_weights(str(logged["root"] / "lora"))
    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        assert same_image(image, render(with_lora, prompt, i, cfg)), "predict = the base pipeline + the run's LoRA"
        assert np.abs(image.astype(int) - render(base, prompt, i, cfg)).max() > 0, "the LoRA changes the image"
    reseeded = predict(logged["model_uri"], logged["uri"], PROMPTS[:1], seed=7)
    assert list(reseeded.seed) == [7] and same_image(np.asarray(decode_image(reseeded.image[0])),
                                                     render(with_lora, PROMPTS[0], 7, cfg))


def test_lora_scale_zero_is_the_base_pipeline_and_a_later_default_request_is_scale_one_again(logged):
    import mlflow

    cfg = logged["cfg"]
    with mlflow_uris(logged["uri"]):
        model = mlflow.pyfunc.load_model(logged["model_uri"])  # one model: the scale must not stick
    frame = pd.DataFrame({"prompt": PROMPTS[:1]})
    zero, default = (np.asarray(decode_image(model.predict(frame, params=params).image[0]))
                     for params in ({"lora_scale": 0.0}, None))
    assert np.array_equal(zero, render(load_pipeline(cfg.model), PROMPTS[0], 0, cfg)), "scale 0: the base pipeline"
    assert np.array_equal(default, np.asarray(decode_image(predict(logged["model_uri"], logged["uri"],
                                                                   PROMPTS[:1]).image[0])))


def test_the_model_carries_the_runs_key_params_and_final_metrics_without_new_run_points(logged):
    from alignprop.platform.mlflow_model import run_model

    client, run_id, cfg = logged["client"], logged["run_id"], logged["cfg"]
    model = run_model(client, run_id)
    assert model.params["algorithm"] == "alignprop" and model.params["base"] == "tiny random pipeline"
    assert model.params["lr"] == f"{cfg.optim.lr:g}" and model.params["truncation"] == "fixed k=4"
    assert model.params["rewards"] == ",".join(f"{r['name']}:{float(r.get('weight', 1.0)):g}" for r in cfg.rewards)
    final = {m.key: (m.value, m.step) for m in model.metrics}
    assert final == {"eval/reward_total": (0.3, 2), "train/loss": (-0.5, 2)}, "the last point of each, not the best"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/reward_total")]
    assert sorted(history) == [(0, 0.1), (1, 0.4), (2, 0.3)], "linking them logged no new run point"


def test_the_model_is_code_not_a_pickle_and_self_contained(logged, tmp_path):
    """Models from code (nothing to unpickle); the LoRA and the run's config inside; pinned requirements."""
    import mlflow.artifacts
    import yaml

    with mlflow_uris(logged["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"], dst_path=str(tmp_path)))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".pickle"))], files
    assert {"MLmodel", "alignprop_model.py", "requirements.txt", "artifacts/config.yaml",
            "artifacts/lora/pytorch_lora_weights.safetensors"} <= set(files), files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    requirements = (local / "requirements.txt").read_text().split()
    for package in ("alignprop-platform==", "diffusers=="):
        assert any(r.startswith(package) for r in requirements), package
    # Loading it from the directory alone (no tracking server) works: it carries the config.
    model = mlflow.pyfunc.load_model(str(local))
    assert len(model.predict(pd.DataFrame({"prompt": ["a cat"]}))) == 1


def test_register_sets_alias_best_and_models_uri_loads(logged):
    import mlflow

    first = register_model(logged["uri"], "tiny-sd", logged["run_id"])
    second = register_model(logged["uri"], "tiny-sd", logged["run_id"])
    assert (first, second) == ("models:/tiny-sd/1", "models:/tiny-sd/2")
    from mlflow import MlflowClient

    registry = MlflowClient(logged["uri"], registry_uri=logged["uri"])
    version = registry.get_model_version_by_alias("tiny-sd", "best")
    assert str(version.version) == "2" and version.run_id == logged["run_id"]
    by_alias = predict("models:/tiny-sd@best", logged["uri"], PROMPTS[:1])
    by_run = predict(logged["model_uri"], logged["uri"], PROMPTS[:1])
    assert by_alias.image[0] == by_run.image[0]
    with pytest.raises(ConfigError) as err:
        register_model(logged["uri"], "no/slashes", logged["run_id"])
    assert str(err.value).startswith("--register: got 'no/slashes'; accepted:") and "\n" not in str(err.value)
    bare = logged["client"].create_run(logged["client"].get_experiment_by_name("tiny-cpu").experiment_id).info.run_id
    with pytest.raises(ConfigError, match="has no MLflow Model named 'model'"):
        register_model(logged["uri"], "tiny-sd", bare)
    assert mlflow.get_registry_uri() != logged["uri"], "global MLflow state restored"


def test_sample_cli_takes_a_models_uri_and_writes_only_its_outputs(logged, tmp_path):
    register_model(logged["uri"], "sampled", logged["run_id"])
    proc = run_cli(["sample", "--config", "tiny-cpu", *OVERRIDES, "--lora", "models:/sampled@best", "--tracking-uri",
                    logged["uri"],
                    "--prompt", PROMPTS[0], "--out", "samples"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["samples", "samples/base_00.png", "samples/lora_00.png"]
    from PIL import Image

    with Image.open(tmp_path / "samples" / "lora_00.png") as png:
        sampled = np.asarray(png.convert("RGB"))
    predicted = predict("models:/sampled@best", logged["uri"], PROMPTS[:1])
    predicted_image = np.asarray(decode_image(predicted.image[0]))
    assert np.array_equal(sampled, predicted_image), "sample and predict agree, seed for seed"


def test_sample_takes_the_base_from_the_loras_run_and_refuses_another_unless_asked(logged, tmp_path):
    """Without --config the LoRA's run config is sampled (the same images as naming that config); a
    --config on another base is one line, before anything is written; --any-base samples it anyway."""
    from PIL import Image

    from alignprop.platform.models import save_tiny_pipeline

    def lora_png(out: str) -> np.ndarray:
        with Image.open(tmp_path / out / "lora_00.png") as png:
            return np.asarray(png.convert("RGB"))

    common = ["--tracking-uri", logged["uri"], "--prompt", PROMPTS[0]]
    lora = f"runs:/{logged['run_id']}/lora/final"
    own = run_cli(["sample", "--lora", lora, *common, "--out", "own"], tmp_path)
    named = run_cli(["sample", "--config", "tiny-cpu", *OVERRIDES, "--lora", lora, *common, "--out", "named"], tmp_path)
    assert own.returncode == 0 and named.returncode == 0, own.stderr + named.stderr
    assert np.array_equal(lora_png("own"), lora_png("named"))
    copy = save_tiny_pipeline(str(tmp_path / "tiny-copy"), "sd")  # the same weights, but another base to the config
    other = ["--config", "tiny-cpu", *OVERRIDES, "model.tiny=false", f"model.pretrained={copy}"]
    for uri in (lora, logged["model_uri"]):
        refused = run_cli(["sample", *other, "--lora", uri, *common, "--out", "refused"], tmp_path)
        message = assert_one_error_line(refused, "--config: its base model is model.pretrained=")
        assert f"but {uri} was trained on the tiny pipeline (model.tiny=true)" in message
    assert not (tmp_path / "refused").exists()
    anyway = run_cli(["sample", *other, "--any-base", "--lora", lora, *common, "--out", "anyway"], tmp_path)
    assert anyway.returncode == 0, anyway.stderr
    assert np.array_equal(lora_png("anyway"), lora_png("own")), "the same weights on the other base"
    no_config = run_cli(["sample", "--lora", str(logged["root"] / "lora"), "--prompt", "a", "--out", "x"], tmp_path)
    assert_one_error_line(no_config, "--config: required unless --lora carries its run's config")


def test_sample_resolves_runs_model_uri_to_the_lora_inside(logged, monkeypatch, tmp_path):
    from alignprop.platform.sample import resolve_lora

    monkeypatch.chdir(tmp_path)
    path = resolve_lora(logged["model_uri"], logged["uri"])
    assert path.name == "lora" and (path / "pytorch_lora_weights.safetensors").is_file()
    assert list(tmp_path.iterdir()) == []


def readme_serve_line() -> str:
    """The README's serve command, as a user copies it."""
    text = (REPO / "README.md").read_text()
    return next(line for line in text.splitlines() if "mlflow models serve" in line and "models:/NAME@best" in line)


def test_mlflow_models_serve_answers_invocations_with_images(logged, tmp_path):
    """The README's `mlflow models serve` line, run by bash from a shell whose PATH lacks the venv (as a
    new terminal's), NAME and port filled in (14-18 s here, so not marked slow): JSON in, base64 PNGs
    out, equal to predict in this process."""
    port = free_port()
    register_model(logged["uri"], "served", logged["run_id"])
    (tmp_path / "mlflow.db").symlink_to(logged["root"] / "mlflow.db")  # the README's $PWD/mlflow.db
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent)  # the venv running these tests
    line = readme_serve_line().replace("models:/NAME@best", "models:/served@best").replace("-p 5001", f"-p {port}")
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    server = subprocess.Popen(["bash", "-c", line], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    try:
        while True:  # readiness: /ping answers 200 once the model is loaded
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)  # polling with a deadline, not a sleep-as-sync
        ready = time.monotonic() - started
        body = {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}, "params": {"seed": 3}}
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=120) as reply:
            predictions = json.loads(reply.read())["predictions"]
        refused = {}  # one request cannot occupy the host: oversized ones are a 400 naming the limit, at once
        for what, rows, params in (("rows", [["a cat"]] * (MAX_ROWS + 1), {}),
                                   ("num_steps", [["a cat"]], {"num_steps": 999})):
            body = {"dataframe_split": {"columns": ["prompt"], "data": rows}, "params": params}
            request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=60)
            refused[what] = (err.value.code, json.loads(err.value.read())["message"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print(f"\n[mlflow-model] serve ready after {ready:.1f} s, total {time.monotonic() - started:.1f} s")
    assert [p["prompt"] for p in predictions] == PROMPTS and [p["seed"] for p in predictions] == [3, 4]
    served = [np.asarray(decode_image(p["image"])) for p in predictions]
    local = predict(logged["model_uri"], logged["uri"], seed=3)
    assert all(np.array_equal(a, np.asarray(decode_image(b))) for a, b in zip(served, local.image))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".venv", "mlflow.db", "serve.log"], "it wrote into its cwd"
    expected = {"rows": f"prompt: {MAX_ROWS + 1} rows; accepted: 1 to {MAX_ROWS} prompts per request",
                "num_steps": f"params.num_steps: got 999; accepted: an integer in [1, {MAX_STEPS}]"}
    for what, message in expected.items():  # MLflow's server puts its own "Failed to predict data ..." first
        assert refused[what][0] == 400 and refused[what][1].endswith(f"Error: {message}"), refused[what]


@pytest.mark.parametrize("params, prompts, message", [
    ({"num_steps": -5}, ["a cat"], "params.num_steps: got -5; accepted: an integer in [1, "),
    ({"num_steps": 10**6}, ["a cat"], "params.num_steps: got 1000000; accepted: an integer in [1, "),
    ({"guidance_scale": 1e308}, ["a cat"], "params.guidance_scale: got 1e+308; accepted: a number in [1.0, "),
    ({}, ["x" * 5000], "prompt: a prompt of 5000 characters; accepted: at most "),
])
def test_predict_refuses_requests_past_its_limits_naming_them(logged, params, prompts, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="^" + re.escape(message)) as err:
        predict(logged["model_uri"], logged["uri"], prompts, **params)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("command", [["train"], ["tune", "--space", "tiny-smoke"]])
def test_register_name_is_checked_before_anything_starts(command, tmp_path, monkeypatch):
    import ray

    from test_cli_errors import assert_one_error_line

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    proc = run_cli([*command, "--config", "tiny-cpu", "--register", "models:/x", f"ray.storage_path={tmp_path}/ray"],
                   tmp_path)
    message = assert_one_error_line(proc,
                                    "--register: got 'models:/x'; accepted: a registered model name of letters, digits")
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_register_cli_registers_a_finished_run_without_training_it(logged, tmp_path):
    """`alignprop register runs:/<id>/model --name NAME`: a new version with alias best, the run untouched."""
    from test_cli_errors import assert_one_error_line

    client, run_id = logged["client"], logged["run_id"]
    before = client.get_run(run_id)
    uri_flag = ["--tracking-uri", logged["uri"]]
    proc = run_cli(["register", logged["model_uri"], "--name", "cli-registered", *uri_flag], tmp_path)
    assert proc.returncode == 0, proc.stderr
    from mlflow import MlflowClient

    registry = MlflowClient(logged["uri"], registry_uri=logged["uri"])
    version = registry.get_model_version_by_alias("cli-registered", "best")
    assert str(version.version) == "1" and version.run_id == run_id
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time, after.data.metrics) == (
        before.info.status, before.info.end_time, before.data.metrics), "registering does not touch the run"
    for args, starts in ((["models:/x/1", "--name", "n", *uri_flag], "model: got 'models:/x/1'; accepted: runs:/"),
                         ([logged["model_uri"], "--name", "a/b", *uri_flag], "--name: got 'a/b'; accepted: "),
                         ([f"runs:/{'0' * 32}/model", "--name", "n", *uri_flag], f"--name: run {'0' * 32} has no "),
                         ([logged["model_uri"], "--name", "n", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"],
                          "--tracking-uri: no MLflow store at ")):
        assert_one_error_line(run_cli(["register", *args], tmp_path), starts)
    assert list(tmp_path.iterdir()) == [], "nothing written"
