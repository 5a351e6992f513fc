"""An MLflow Model per run: the run's trained LoRA on its base pipeline, as a pyfunc.

    mlflow.pyfunc.load_model("runs:/<run_id>/model").predict(pd.DataFrame({"prompt": ["a cat"]}))
    alignprop train --config tiny-cpu --register tiny-sd        # version + alias best: models:/tiny-sd@best
    MLFLOW_TRACKING_URI=sqlite:////abs/mlflow.db mlflow models serve -m models:/tiny-sd@best --env-manager local -p 5001
    curl -X POST 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["prompt"], "data": [["a cat"]]}, "params": {"seed": 1}}'

The Model is MLflow's "models from code": its MLmodel names a three-line Python file that imports
`AlignPropModel` from the installed alignprop package, so nothing is unpickled when it loads (MLflow
3.17 refuses cloudpickled models by default anyway). Its artifacts hold everything it needs — the
LoRA (`artifacts/lora/pytorch_lora_weights.safetensors`) and the run's resolved `config.yaml`, which
names the base pipeline — so loading it does not need the tracking server, only the base weights
(hub cache or local directory; the tiny pipeline is built offline). Serving needs alignprop installed
in the serving Python (`--env-manager local` from this venv).

MLflow 3 logs a model as a LoggedModel entity (its files live under the experiment's `models/`, not
in the run's artifact folder); `runs:/<run_id>/model` resolves to the newest LoggedModel named `model`
whose source run is <run_id>, and registered versions point at `models:/<model_id>`.
"""

from __future__ import annotations

import base64
import io
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import pandas as pd

from alignprop.platform.config import SAFE_NAME, SAFE_NAME_TEXT, ConfigError, RunConfig, from_dict

MODEL_NAME = "model"  # runs:/<run_id>/model
ALIAS = "best"  # models:/<name>@best
LORA_ARTIFACT = "lora/final"
CODE_FILE = "alignprop_model.py"
MODEL_CODE = '''"""MLflow models-from-code entry point of an AlignProp run's Model (alignprop.platform.mlflow_model)."""
import mlflow

from alignprop.platform.mlflow_model import AlignPropModel

mlflow.models.set_model(AlignPropModel())
'''
# What one request may ask (a request past these is refused with a 400 naming the limit, before any
# sampling: one request cannot occupy the host for long).
MAX_ROWS, MAX_PROMPT_CHARS, MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 16, 1000, 200, 100.0, 2**31 - 1
MAX_LORA_SCALE = 4.0
# What loading the Model imports; pinned to this environment's versions (MLflow infers nothing).
REQUIREMENTS = ("alignprop-platform", "mlflow", "torch", "diffusers", "transformers", "peft", "safetensors",
                "omegaconf", "pillow", "pandas")


class AlignPropModel(mlflow.pyfunc.PythonModel):
    """Text → image with the run's LoRA (`lora/final`, the adapter at the end of training) applied to
    the base pipeline named by the run's config (`model.pretrained` hub id or local directory, or
    `model.tiny: true`), on CUDA if there is one.

    `predict(df)` takes a DataFrame with a `prompt` column and returns a DataFrame with one row per
    prompt: `prompt`, `seed` and `image`, a base64-encoded PNG (a string: the same in Python and in
    `mlflow models serve`'s JSON, `{"predictions": [{"prompt", "seed", "image"}, ...]}`;
    `decode_image` turns it into a PIL image). Params (MLflow `params=`): `seed` (default 0; row i
    uses seed + i, as `alignprop sample` does, so the same seed gives the same image),
    `num_steps` and `guidance_scale` (default: the run's `sampling` values), `lora_scale` (default 1: the
    adapter at that × its trained strength, DRaFT's remedy for over-optimisation). A request of more than
    MAX_ROWS prompts, a prompt over MAX_PROMPT_CHARS characters, or params outside their ranges is
    refused with an `INVALID_PARAMETER_VALUE` error (HTTP 400 when served) that names the limit."""

    def load_context(self, context) -> None:
        import threading

        import torch

        from alignprop.platform.models import LoraFold, load_pipeline
        from alignprop.platform.console import load_lora_weights
        from alignprop.platform.soup.mix import lora_weights_file
        from alignprop.trainers.families import denoiser_of, family_of

        cfg = read_config(context.artifacts["config"])
        self.sampling = cfg.sampling
        self.pipe = load_pipeline(cfg.model).to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.family = family_of(self.pipe)  # its own diffusers pipeline call: SD, SDXL or SD3
        weights = lora_weights_file(context.artifacts["lora"])  # a checked safetensors file: never a pickle
        load_lora_weights(self.pipe, str(weights.parent), weights.name)
        self.fold = LoraFold(denoiser_of(self.pipe))  # each request folds the LoRA (at its scale) into the weights
        self.lock = threading.Lock()  # one request at a time changes the scale and the weights

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        import torch

        from alignprop.platform.models import set_pipeline_lora_scale

        params, s = params or {}, self.sampling
        seed = _param(params, "seed", 0, int, 0, MAX_SEED)
        steps = _param(params, "num_steps", s.num_steps, int, 1, MAX_STEPS)
        guidance = _param(params, "guidance_scale", s.guidance_scale, float, 1.0, MAX_GUIDANCE)
        lora_scale = _param(params, "lora_scale", 1.0, float, 0.0, MAX_LORA_SCALE)
        prompts = _prompts(model_input)
        with self.lock, torch.no_grad():
            set_pipeline_lora_scale(self.pipe, lora_scale)  # every request sets it: a default request is scale 1
            with self.fold.folded():
                rows = [self._render(prompt, seed + i, steps, guidance) for i, prompt in enumerate(prompts)]
        return pd.DataFrame(rows, columns=["prompt", "seed", "image"])

    def _render(self, prompt: str, seed: int, steps: int, guidance: float) -> dict[str, Any]:
        import torch

        kwargs = {**self.family.call_kwargs(self.sampling), "num_inference_steps": steps, "guidance_scale": guidance}
        image = self.pipe(prompt, generator=torch.Generator(device="cpu").manual_seed(seed), **kwargs).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"prompt": prompt, "seed": seed, "image": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _refuse(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _param(params: dict, name: str, default, kind: type, low, high):
    """A request param as `kind` within [low, high] (None or absent: `default`), else a 400 naming the range."""
    value = params.get(name)
    if value is None:
        return default
    try:
        number = kind(value)
        whole = kind is not int or float(value) == number
    except (TypeError, ValueError, OverflowError):
        number, whole = None, False
    if not whole or number is None or not low <= number <= high:
        raise _refuse(f"params.{name}: got {value!r}; accepted: {'an integer' if kind is int else 'a number'} "
                      f"in [{low}, {high}]")
    return number


def _prompts(model_input: pd.DataFrame) -> list[str]:
    if "prompt" not in model_input:
        raise _refuse("prompt: no such column; accepted: a DataFrame with a 'prompt' column")
    prompts = [str(p) for p in model_input["prompt"]]
    if not 1 <= len(prompts) <= MAX_ROWS:
        raise _refuse(f"prompt: {len(prompts)} rows; accepted: 1 to {MAX_ROWS} prompts per request")
    longest = max(len(p) for p in prompts)
    if longest > MAX_PROMPT_CHARS:
        raise _refuse(f"prompt: a prompt of {longest} characters; accepted: at most {MAX_PROMPT_CHARS}")
    return prompts


def decode_image(encoded: str):
    """A `predict` result's `image` cell (base64 PNG) → PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return image.convert("RGB")


def read_config(path: str | os.PathLike) -> RunConfig:
    """The run's config.yaml (as the run logged it) → RunConfig; plain YAML, no code."""
    import yaml

    return from_dict(yaml.safe_load(Path(path).read_text()))


def check_model_name(name: str, flag: str = "--register") -> str:
    """A registered model name that reads unambiguously in models:/<name>@best (the run-name rule)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{flag}: got {name!r}; accepted: a registered model name of {SAFE_NAME_TEXT}")
    return name


def _signature(cfg: RunConfig):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("num_steps", "long", cfg.sampling.num_steps),
                            ParamSpec("guidance_scale", "double", float(cfg.sampling.guidance_scale)),
                            ParamSpec("lora_scale", "double", 1.0)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


@contextmanager
def mlflow_uris(uri: str):
    """MLflow's fluent model functions read the global tracking and registry URIs (models:/ lookups
    would otherwise fall back to ./mlflow.db): set both to `uri` for the call, then restore them."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        if hasattr(registry_utils, "_registry_uri"):
            registry_utils._registry_uri = saved[1]
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_run_model(tracking_uri: str, run_id: str, lora: str = LORA_ARTIFACT) -> str:
    """Log the run's MLflow Model, named `model`, from its `lora` artifact (default `lora/final`) and
    its `config.yaml`, linked to the run at its last logged step; returns `runs:/<run_id>/model`.

    Called on the driver after training, while the run is open; a rerun of the run logs a new one
    (the newest is what `runs:/<run_id>/model` loads). Writes nothing outside a temporary directory."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.entities import LoggedModelOutput

    from alignprop.platform.soup.mix import lora_weights_file
    from alignprop.platform.tracking import last_logged_step

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run").mkdir()
        fetched = Path(download_artifacts(run_id=run_id, artifact_path=lora, dst_path=f"{tmp}/run",
                                          tracking_uri=tracking_uri))
        lora_dir = str(fetched.rename(Path(tmp) / "lora"))  # the Model's artifacts/lora
        config = download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp, tracking_uri=tracking_uri)
        lora_weights_file(lora_dir, source=f"runs:/{run_id}/{lora}")
        cfg = read_config(config)
        code = Path(tmp) / CODE_FILE
        code.write_text(MODEL_CODE)
        # Created here, in the run's experiment (MLflow's fluent path would pick the active or the
        # default experiment), with the run's key params; its final metrics are linked below.
        model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                           model_type="alignprop-lora", tags={"alignprop.lora": lora},
                                           params=model_params(cfg))
        with mlflow_uris(tracking_uri), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")  # on purpose: see _signature
            mlflow.pyfunc.log_model(
                name=MODEL_NAME, model_id=model.model_id, python_model=str(code),
                artifacts={"lora": lora_dir, "config": config}, signature=_signature(cfg),
                pip_requirements=_requirements(),
            )
    step = last_logged_step(client, run_id)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=max(step, 0))])
    link_final_metrics(client, run_id, model.model_id)
    return f"runs:/{run_id}/{MODEL_NAME}"


def model_params(cfg: RunConfig) -> dict[str, str]:
    """What the Model page shows of how it was trained: algorithm, base, rewards, K, lr, steps, rank, seed."""
    rewards = ",".join(f"{r.get('label', r['name'])}:{float(r.get('weight', 1.0)):g}" for r in cfg.rewards)
    base = cfg.model.pretrained or f"tiny {cfg.model.arch or 'random'} pipeline"
    return {"algorithm": cfg.trainer.algorithm, "base": base, "rewards": rewards,
            "truncation": f"{cfg.truncation.strategy} k={cfg.truncation.k}", "lr": f"{cfg.optim.lr:g}",
            "max_steps": str(cfg.trainer.max_steps), "lora_rank": str(cfg.lora.rank),
            "sampling_steps": str(cfg.sampling.num_steps), "seed": str(cfg.trainer.seed)}


def link_final_metrics(client, run_id: str, model_id: str) -> None:
    """The run's last value of each metric, linked to the Model (its page lists them). Logged again
    with the same key, value, step and timestamp: the run's own history gets no new point."""
    from mlflow.entities import Metric

    metrics = []
    for key in client.get_run(run_id).data.metrics:
        last = max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        metrics.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 1000], synchronous=True)


def run_model(client, run_id: str):
    """The newest READY LoggedModel named `model` that `run_id` logged, or None."""
    from mlflow.entities import LoggedModelStatus

    outputs = client.get_run(run_id).outputs
    models = [client.get_logged_model(o.model_id) for o in (outputs.model_outputs if outputs else [])]
    models = [m for m in models if m.name == MODEL_NAME and m.status == LoggedModelStatus.READY]
    return max(models, key=lambda m: m.creation_timestamp, default=None)


def register_model(tracking_uri: str, name: str, run_id: str, flag: str = "--register") -> str:
    """Register the run's Model (`runs:/<run_id>/model`) as a new version of `name`, with the tracking
    URI as the registry, and point alias `best` at it. Returns `models:/<name>/<version>`. `flag`
    names the option in errors."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_model_name(name, flag)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        model = run_model(client, run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        model = None
    if model is None:
        raise ConfigError(f"{flag}: run {run_id} has no MLflow Model named {MODEL_NAME!r} at {tracking_uri}; "
                          "accepted: a run that finished training (it logs runs:/<run_id>/model)")
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with mlflow_uris(tracking_uri):  # a local store resolves a models:/<model_id> source through the global client
        version = client.create_model_version(name, f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id)
    client.set_registered_model_alias(name, ALIAS, version.version)
    return f"models:/{name}/{version.version}"


def run_id_of_model_uri(model_uri: str) -> str:
    """`runs:/<run_id>/model` (or `runs:/<run_id>`) → run_id; anything else is a one-line error."""
    match = re.fullmatch(r"runs:/([0-9a-f]{32})(?:/model)?/?", model_uri)
    if match is None:
        raise ConfigError(f"model: got {model_uri!r}; accepted: runs:/<run_id>/model (a run's MLflow Model)")
    return match.group(1)


def config_in_model(path: str | os.PathLike) -> Optional[Path]:
    """A downloaded MLflow Model directory → the run's config.yaml inside it (artifacts.config), or None."""
    import yaml

    path = Path(path)
    if not (path / "MLmodel").is_file():
        return None
    flavor = (yaml.safe_load((path / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
    relative = ((flavor.get("artifacts") or {}).get("config") or {}).get("path")
    return path / relative if relative and (path / relative).is_file() else None


def lora_in_model(path: str | os.PathLike) -> Path:
    """A downloaded MLflow Model directory (one holding `MLmodel`) → its LoRA directory (from the
    pyfunc flavor's `artifacts.lora`); any other path is returned as it is."""
    import yaml

    path = Path(path)
    if not (path / "MLmodel").is_file():
        return path
    flavor = (yaml.safe_load((path / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
    relative = ((flavor.get("artifacts") or {}).get("lora") or {}).get("path")
    if not relative:
        raise ConfigError(f"--lora: the MLflow Model at {path} holds no LoRA (no artifacts.lora in its MLmodel); "
                          "accepted: an AlignProp run's Model (runs:/<run_id>/model, models:/<name>@best) or a LoRA "
                          "directory")
    return path / relative
