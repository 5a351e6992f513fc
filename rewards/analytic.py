"""Analytic rewards: differentiable, model-free, offline. Useful for tests, demos and as regularisers."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Reward


class Brightness(Reward):
    """Mean pixel value in [0, 1]; with `target`, −|mean − target| (AlignProp's target form)."""

    name = "brightness"

    def __init__(self, target: Optional[float] = None):
        super().__init__()
        self.target = target

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        mean = images.float().mean(dim=(1, 2, 3))
        return mean if self.target is None else -(mean - self.target).abs()


class Saturation(Reward):
    """Mean HSV saturation, (max − min) / max per pixel, in [0, 1]."""

    name = "saturation"

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = images.float()
        high, low = x.amax(dim=1), x.amin(dim=1)
        return ((high - low) / (high + self.eps)).mean(dim=(1, 2))


class Colorfulness(Reward):
    """Hasler & Süsstrunk (2003) colourfulness on [0, 1] pixels (≈ 0 grey … ≈ 0.5 vivid)."""

    name = "colorfulness"

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        r, g, b = images.float().unbind(dim=1)
        rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
        spread = (rg.var(dim=1) + yb.var(dim=1) + self.eps).sqrt()
        centre = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + self.eps).sqrt()
        return spread + 0.3 * centre
