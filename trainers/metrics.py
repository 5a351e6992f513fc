"""Evaluation metrics of the samples themselves (no reward model): how alike one prompt's samples are."""

from __future__ import annotations

import torch


@torch.no_grad()
def diversity(images: torch.Tensor) -> float:
    """Mean pairwise pixel RMS distance between the samples of each prompt, averaged over prompts.

    `images`: P×S×C×H×W in [0, 1] (P prompts, S >= 2 seeds each). 0 when a prompt's samples are
    identical; 1 at most (each pixel channel as far apart as [0, 1] allows)."""
    p, s = images.shape[:2]
    if s < 2:
        raise ValueError(f"diversity needs >= 2 samples per prompt, got {s}")
    flat = images.reshape(p, s, -1).float()
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") / flat.shape[-1] ** 0.5  # P×S×S
    pairs = s * (s - 1)
    return float((dist.sum((1, 2)) / pairs).mean())
