"""LAION aesthetic reward: CLIP ViT-L/14 image embedding → the LAION linear MLP → a score (≈ 1…10).

    reward = build_reward({"name": "aesthetic", "mlp_path": "/models/sac+logos+ava1-l14-linearMSE.pth"})
    scores = reward(images, prompts)             # images: B×3×H×W in [0, 1] → B scores, differentiable

The MLP weights come from https://github.com/christophschuhmann/improved-aesthetic-predictor
(`sac+logos+ava1-l14-linearMSE.pth`); `clip_model` is a hub id or a local directory holding a
CLIPModel or CLIPVisionModelWithProjection checkpoint. Only the vision tower is loaded.

`resize: reference` (default) feeds CLIP its own preprocessing (shorter side → 224, bicubic,
antialiased, centre crop: `clip_preprocess`, as the LAION predictor's CLIP `preprocess` does);
`resize: official` the official AlignProp training code's (`torchvision.transforms.Resize(224)`
on tensors under its torchvision 0.15.2: bilinear, no antialias; + centre crop:
`official_preprocess`).

`dtype` (`auto` default: the worker's compute dtype, float32 outside a worker; or float32,
bfloat16, float16) is the dtype of the CLIP tower and MLP; preprocessing and scores stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .base import (DTYPE_CHOICES, RESIZE_MODES, Reward, clip_preprocess, official_preprocess,
                                    read_state_dict)

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
MLP_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor"


class AestheticMLP(nn.Module):
    """The released LAION head: linear layers and dropout, no activations; keys `layers.{0,2,4,6,7}.*`."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_mlp_state(mlp_path: Optional[str]) -> dict[str, torch.Tensor]:
    """Read the MLP state dict from a .pth/.pt or .safetensors file; one-line error if it is absent."""
    if mlp_path is None or not Path(mlp_path).is_file():
        raise FileNotFoundError(
            f"aesthetic: MLP weights not found (mlp_path={mlp_path!r}); expected {MLP_FILE} from {MLP_URL} "
            f"— download it and set the reward option mlp_path to its local path")
    return read_state_dict(mlp_path)


def load_clip_vision(clip_model: str, local_files_only: bool) -> nn.Module:
    """CLIPVisionModelWithProjection from a CLIPModel or vision-only checkpoint.

    A CLIPModel's projection size lives in the top-level `projection_dim`; its `vision_config`
    may carry a different (default 512) value, which would make the projection fail to load.
    """
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(clip_model, local_files_only=local_files_only)
    if isinstance(config, CLIPConfig):
        config.vision_config.projection_dim = config.projection_dim
        config = config.vision_config
    return CLIPVisionModelWithProjection.from_pretrained(
        clip_model, config=config, local_files_only=local_files_only)


class Aesthetic(Reward):
    """LAION aesthetic score of each image; with `target`, −|target − score| (AlignProp's form).

    Frozen on construction (eval mode, no parameter requires grad). `resize`, `dtype`: see the module doc.
    """

    name = "aesthetic"
    needs = f"CLIP ViT-L/14 (openai/clip-vit-large-patch14) + LAION MLP {MLP_FILE} ({MLP_URL})"
    choices = {"resize": RESIZE_MODES, "dtype": DTYPE_CHOICES}

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", mlp_path: Optional[str] = None,
                 target: Optional[float] = None, local_files_only: bool = False, resize: str = "reference",
                 dtype: str = "auto"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"aesthetic: resize {resize!r} unknown; accepted: {', '.join(RESIZE_MODES)}")
        self.resize = resize
        state = load_mlp_state(mlp_path)  # before CLIP: fail fast on the cheap check
        self.clip = load_clip_vision(clip_model, local_files_only)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        self.mlp.load_state_dict(state)
        self.image_size = self.clip.config.image_size
        self.target = target
        self.freeze().cast(dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        preprocess = clip_preprocess if self.resize == "reference" else official_preprocess
        embed = self.clip(pixel_values=self._to_model(preprocess(images, self.image_size))).image_embeds.float()
        embed = embed / embed.norm(dim=-1, keepdim=True)
        scores = self.mlp(self._to_model(embed)).squeeze(-1).float()
        return scores if self.target is None else -(self.target - scores).abs()
