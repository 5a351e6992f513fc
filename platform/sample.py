"""`alignprop sample`: PNGs from the base pipeline and the same seeds with a trained LoRA.

    alignprop sample --config tiny-cpu --lora runs:/<run_id>/lora/final --prompt "a cat" --out samples/
    alignprop sample --config tiny-cpu --lora models:/<name>@best --tracking-uri sqlite:////abs/mlflow.db ...
    alignprop sample --config tiny-cpu --lora runs:/<run_id>/model --prompt "a cat" --out samples/
    alignprop sample --lora runs:/<run_id>/lora/final --prompt "a cat" --out samples/   # the run's own config

An MLflow URI is resolved against the tracking URI, which is also used as the model registry URI
(for models:/); nothing is created in the working directory while resolving it. A URI (or a local
directory) holding an AlignProp run's MLflow Model (`runs:/<id>/model`, `models:/<name>@best`
registered by `--register`) gives the LoRA inside the Model's artifacts.

Such a LoRA carries its run's config.yaml: without `--config` it is the config sampled with (overrides
apply); a `--config` whose base model differs from the one the LoRA was trained on is refused in one
line (noise from a LoRA on the wrong base otherwise), unless `--any-base` says it is meant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ConfigError, ModelSection, RunConfig, load_config
from .models import LORA_WEIGHTS_NAME, TOY_WORLD_MODEL, LoraFold, load_pipeline, set_pipeline_lora_scale
from .console import load_lora_weights
from ..trainers.families import denoiser_of, family_of
from .soup.mix import check_fits, lora_weights_file
from .mlflow_model import config_in_model, lora_in_model, mlflow_uris, read_config
from .toy_world import vocabulary_warning
from .tracking import resolve_tracking_uri

MLFLOW_SCHEMES = ("runs:/", "models:/")
URI_ACCEPTED = ("runs:/<run_id>/lora/final, runs:/<run_id>/model or models:/<name>/<version> (or "
                "models:/<name>@<alias>) "
                "logged to --tracking-uri")


def is_mlflow_uri(lora: str) -> bool:
    return "://" in lora or lora.startswith(MLFLOW_SCHEMES)


def resolve_lora(lora: str, tracking_uri: Optional[str] = None) -> Path:
    """A LoRA directory, a .safetensors file, an MLflow Model directory, or an MLflow URI → local directory/file.

    Raises a one-line ConfigError or FileNotFoundError naming the LoRA (and the tracking URI) when it
    cannot be found or is not a safetensors adapter; nothing is unpickled."""
    if is_mlflow_uri(lora):
        path = _download(lora, tracking_uri)
    else:
        path = Path(lora).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--lora: {path} does not exist; accepted: a directory holding "
                                    f"{LORA_WEIGHTS_NAME}, the file itself, "
                                    "an MLflow Model directory, or runs:/<run_id>/lora/final")
    if (path / "MLmodel").is_file():  # an AlignProp run's MLflow Model: the LoRA in its artifacts
        path = lora_in_model(path)
    lora_weights_file(path, source=lora)
    return path


def sample_setup(config: Optional[str], overrides: Sequence[str], lora: Optional[str],
                 tracking_uri: Optional[str] = None, any_base: bool = False) -> tuple[RunConfig, Optional[Path]]:
    """The config to sample with and the resolved LoRA: `config` (checked against the base the LoRA was
    trained on, when the LoRA says) or, without one, the config of the run that trained the LoRA."""
    given = load_config(config, overrides) if config else None
    uri = tracking_uri or (given.tracking.uri if given else None)
    lora_path, trained = resolve_lora_and_config(lora, uri) if lora else (None, None)
    if given is None:
        if trained is None:
            raise ConfigError("--config: required unless --lora carries its run's config; accepted: a preset or "
                              "YAML path, or a --lora that is runs:/<run_id>/..., models:/<name>@<alias> or a Model "
                              "directory")
        return load_config(str(trained), overrides, paths=False), lora_path
    if trained is not None and not any_base:
        theirs = read_config(trained).model
        if _base(theirs) != _base(given.model):
            raise ConfigError(f"--config: its base model is {_describe(given.model)}, but {lora} was trained on "
                              f"{_describe(theirs)}; accepted: no --config (the run's own), a --config with that base, "
                              "or --any-base to sample this base anyway")
    return given, lora_path


def _base(model: ModelSection) -> tuple:
    return model.pretrained, model.tiny, model.arch, model.revision


def _describe(model: ModelSection) -> str:
    if model.tiny:
        return "the tiny pipeline (model.tiny=true)"
    if model.arch and not model.pretrained:
        return f"model.arch={model.arch}"
    return f"model.pretrained={model.pretrained}" + (f"@{model.revision}" if model.revision else "")


def resolve_lora_and_config(lora: str, tracking_uri: Optional[str] = None) -> tuple[Path, Optional[Path]]:
    """`resolve_lora`, and the config.yaml of the run that trained it where the LoRA carries one (an
    MLflow Model's artifacts, or the run of a runs:/ URI); None for a plain LoRA directory or file."""
    model_dir = None
    if is_mlflow_uri(lora):
        path = _download(lora, tracking_uri)
    else:
        path = Path(lora).expanduser()
    if (path / "MLmodel").is_file():
        model_dir = path
    lora_path = resolve_lora(str(path) if is_mlflow_uri(lora) else lora, tracking_uri)
    if model_dir is not None:
        return lora_path, config_in_model(model_dir)
    if lora.startswith("runs:/"):
        return lora_path, _run_config(lora.split("/")[1], tracking_uri)
    return lora_path, None


def _run_config(run_id: str, tracking_uri: Optional[str]) -> Optional[Path]:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/config.yaml", tracking_uri=uri))
    except (MlflowException, OSError):  # a run without one (not logged by alignprop train)
        return None


def _download(lora: str, tracking_uri: Optional[str]) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    _check_local_store(uri, lora)
    try:
        with mlflow_uris(uri):  # models:/ resolution reads the global registry URI, not the argument
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=lora, tracking_uri=uri, registry_uri=uri))
    except (MlflowException, OSError) as err:
        reason = " ".join(str(getattr(err, "message", None) or err).split())[:200]
        raise ConfigError(f"--lora: cannot resolve {lora} at tracking URI {uri} ({reason}); "
                          f"accepted: {URI_ACCEPTED}") from None


def _check_local_store(uri: str, lora: str) -> None:
    """A local store must already exist (it holds the run): never create ./mlflow.db or ./mlruns."""
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///"):])
    elif uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        store = Path(unquote(urlparse(uri).path))
    else:
        return
    if not store.exists():
        raise ConfigError(f"--tracking-uri: no MLflow store at {store} to resolve {lora}; accepted: the tracking URI "
                          "the run was "
                          "logged to (--tracking-uri or MLFLOW_TRACKING_URI, e.g. sqlite:////abs/path/mlflow.db or "
                          "http://127.0.0.1:5000)")


@torch.no_grad()
def write_samples(cfg: RunConfig, prompts: Sequence[str], out: str, lora: Optional[str], seed: int = 0,
                  tracking_uri: Optional[str] = None, lora_path: Optional[Path] = None,
                  lora_scale: float = 1.0) -> list[Path]:
    """Writes base_<i>.png (and lora_<i>.png with `lora`, at `lora_scale` × its strength) for each prompt,
    same seed per prompt (`lora_path`: `lora` already resolved, by `sample_setup`)."""
    if lora and lora_path is None:
        lora_path = resolve_lora(lora, tracking_uri or cfg.tracking.uri)  # fail before loading models
    lora_file = lora_weights_file(lora_path, source=lora) if lora_path else None
    if cfg.model.pretrained == TOY_WORLD_MODEL and (warning := vocabulary_warning(prompts)):
        print(warning, file=sys.stderr, flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(cfg.model).to(device)
    if lora_file is not None:
        check_fits(lora_file, denoiser_of(pipe))  # before diffusers' "size mismatch" traceback
    family = family_of(pipe)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.sampling
    written = []
    variants = [("base", None)] + ([("lora", lora_file)] if lora_file else [])
    for tag, path in variants:
        if path is not None:  # always the checked .safetensors file: diffusers never falls back to a pickle
            load_lora_weights(pipe, str(path.parent), path.name)
            if lora_scale != 1.0:
                set_pipeline_lora_scale(pipe, lora_scale)
        with LoraFold(denoiser_of(pipe)).folded():  # the LoRA in the weights: the bare model's speed
            for i, prompt in enumerate(prompts):
                image = pipe(prompt, generator=torch.Generator(device="cpu").manual_seed(seed + i),
                             **family.call_kwargs(s)).images[0]
                written.append(out_dir / f"{tag}_{i:02d}.png")
                image.save(written[-1])
    return written
