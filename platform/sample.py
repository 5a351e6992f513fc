"""`alignprop sample`: PNGs from the base pipeline and the same seeds with a trained LoRA.

    alignprop sample --config tiny-cpu --lora runs:/<run_id>/lora/final --prompt "a cat" --out samples/
    alignprop sample --config tiny-cpu --lora models:/<name>@best --tracking-uri sqlite:////abs/mlflow.db ...
    alignprop sample --config tiny-cpu --lora runs:/<run_id>/model --prompt "a cat" --out samples/

An MLflow URI is resolved against the tracking URI, which is also used as the model registry URI
(for models:/); nothing is created in the working directory while resolving it. A URI (or a local
directory) holding an AlignProp run's MLflow Model (`runs:/<id>/model`, `models:/<name>@best`
registered by `--register`) gives the LoRA inside the Model's artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ConfigError, RunConfig
from .models import LORA_WEIGHTS_NAME, load_pipeline
from .console import load_lora_weights
from ..trainers.families import denoiser_of, family_of
from .soup.mix import check_fits, lora_weights_file
from .mlflow_model import lora_in_model, mlflow_uris
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
                  tracking_uri: Optional[str] = None) -> list[Path]:
    """Writes base_<i>.png (and lora_<i>.png with `lora`) for each prompt, same seed per prompt."""
    lora_path = resolve_lora(lora, tracking_uri or cfg.tracking.uri) if lora else None  # fail before loading models
    lora_file = lora_weights_file(lora_path, source=lora) if lora_path else None
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
        for i, prompt in enumerate(prompts):
            image = pipe(prompt, generator=torch.Generator(device="cpu").manual_seed(seed + i),
                         **family.call_kwargs(s)).images[0]
            written.append(out_dir / f"{tag}_{i:02d}.png")
            image.save(written[-1])
    return written
