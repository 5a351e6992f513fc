"""`alignprop sample`: PNGs from the base pipeline and the same seeds with a trained LoRA.

    alignprop sample --config tiny-cpu --lora runs:/<run_id>/lora/final --prompt "a cat" --out samples/
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from alignprop.platform.config import RunConfig
from alignprop.platform.models import LORA_WEIGHTS_NAME, load_pipeline


def resolve_lora(lora: str, tracking_uri: Optional[str] = None) -> Path:
    """A LoRA directory, a .safetensors file, or an MLflow artifact URI → local directory/file."""
    if "://" in lora or lora.startswith("runs:/") or lora.startswith("models:/"):
        import mlflow.artifacts

        from alignprop.platform.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=lora, tracking_uri=uri))
    path = Path(lora).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--lora: {path} does not exist; expected a directory holding {LORA_WEIGHTS_NAME}, the file itself, or runs:/<run_id>/lora/final")
    return path


@torch.no_grad()
def write_samples(cfg: RunConfig, prompts: Sequence[str], out: str, lora: Optional[str], seed: int = 0,
                  tracking_uri: Optional[str] = None) -> list[Path]:
    """Writes base_<i>.png (and lora_<i>.png with `lora`) for each prompt, same seed per prompt."""
    lora_path = resolve_lora(lora, tracking_uri) if lora else None  # fail before loading models
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(cfg.model).to(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.sampling
    written = []
    variants = [("base", None)] + ([("lora", lora_path)] if lora_path else [])
    for tag, path in variants:
        if path is not None:
            if path.is_file():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name)
            else:
                pipe.load_lora_weights(str(path))
        for i, prompt in enumerate(prompts):
            image = pipe(
                prompt, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta,
                height=s.resolution, width=s.resolution,
                generator=torch.Generator(device="cpu").manual_seed(seed + i),
            ).images[0]
            written.append(out_dir / f"{tag}_{i:02d}.png")
            image.save(written[-1])
    return written
