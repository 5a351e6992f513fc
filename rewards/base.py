"""The `Reward` interface and the weighted sum that AlignProp maximises."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A model-backed reward's `dtype` option: the network's weights and inputs; `auto` = the worker's.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


class Reward(nn.Module):
    """A differentiable score per image.

    Subclasses implement `score(images, prompts) -> Tensor[B]` with `images` a float tensor in
    [0, 1] of shape B×3×H×W on the reward's device. Model-backed rewards do their own
    preprocessing on tensors (resize, normalise) so gradients flow back to the pixels; their
    weights are frozen (`requires_grad_(False)`, eval mode) by `freeze()`. They take a `dtype`
    option (DTYPE_CHOICES) and run their network in `compute_dtype` (`cast`): preprocessing stays
    float32, `_to_model` casts its output just before the forward, and scores come back float32.
    """

    name: str = "reward"
    needs: str = "nothing (analytic)"  # what the reward loads: shown by `alignprop rewards list`
    differentiable: bool = True  # False: a metric for eval_rewards only
    # Options with a fixed set of accepted values, refused at config load otherwise (validate_reward_specs).
    choices: dict[str, tuple] = {}
    compute_dtype: torch.dtype = torch.float32  # the network's dtype (model-backed rewards, set by `cast`)

    @classmethod
    def spec_error(cls, spec: dict[str, Any]) -> Optional[tuple[str, str]]:
        """(option, message) when the options contradict each other; checked at config load."""
        return None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be B×3×H×W, got {tuple(images.shape)}")
        scores = self.score(images, prompts)
        assert scores.shape == (images.shape[0],), f"{self.name} returned {tuple(scores.shape)}"
        return scores

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        return self.eval()

    def cast(self, dtype: str = "auto", worker: Optional[torch.dtype] = None) -> "Reward":
        """Weights to the `dtype` option's dtype; `auto`: the worker's compute dtype (float32 if None)."""
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"{self.name}: dtype {dtype!r} unknown; accepted: {', '.join(DTYPE_CHOICES)}")
        self.compute_dtype = (worker or torch.float32) if dtype == "auto" else DTYPES[dtype]
        return self.to(self.compute_dtype)

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed float32 input → the network's dtype (a differentiable cast: grads reach the pixels)."""
        return x.to(self.compute_dtype)


def clip_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's resize (shorter side, bicubic) + centre crop + normalise, on tensors so grads flow.

    Sizes and crop offsets follow transformers' CLIPImageProcessor; computed in float32.
    """
    x = images.float()
    h, w = x.shape[-2:]
    resized = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std
RESIZE_MODES = ("reference", "official")


def official_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The official AlignProp training code's reward input: `torchvision.transforms.Resize(size)`
    on tensors under its pinned torchvision 0.15.2 (bilinear, no antialias, shorter side to `size`,
    longer side int(size·long/short)), then normalise. Its 512×512 images need no crop; a
    non-square image is centre-cropped to size×size here (torchvision CenterCrop offsets)."""
    x = images.float()
    h, w = x.shape[-2:]
    resized = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False, antialias=False)
    top, left = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A reward checkpoint's state dict: .safetensors, or .pt/.pth read with weights_only=True
    (never unpickling arbitrary objects), unwrapped from {"state_dict": ...} when so saved."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


class WeightedRewards(nn.Module):
    """sum_i weight_i * reward_i(images, prompts), reporting every (raw) component.

    A component with `normalize` enters the sum as (r − running mean) / running std, so weights of
    rewards on different scales are comparable. The running statistics are updated by the caller
    with the scores of all ranks (`update_stats`, once per optimizer step), so every rank
    normalises identically. With `normalize_decay` d in (0, 1) (default 0.99) they are an
    exponential moving average over steps: the first step's batch sets (mean, var), and each later
    batch (mean_b, var_b: mean and unbiased variance of that step's scores) is mixed in with weight
    1 − d as a two-component mixture, `mean' = d·mean + (1−d)·mean_b`, `var' = d·var + (1−d)·var_b
    + d·(1−d)·(mean_b − mean)²` (≈ the last 1/(1−d) steps). With d = None or 0 they are the exact
    all-history mean and unbiased variance over every image (Welford/Chan).

    Before any update a batch is normalised by its own statistics; pass `gather` to `forward`
    (a function concatenating a detached tensor across ranks along dim 0) so that this first
    normalisation uses every rank's scores and ranks agree from the first step.

    `stats` is JSON-serialisable: `{label: [images, mean, var, steps]}` (images folded in, running
    mean, running variance, update calls); restore with `stats.update(saved)`. The older
    3-element `[count, mean, M2]` (Welford) form is still read.
    """

    def __init__(self, named: Sequence[tuple[str, float, Reward]], normalize: Sequence[bool] = (),
                 normalize_decay: Sequence[Optional[float]] | Optional[float] = 0.99):
        super().__init__()
        self.labels = [label for label, _, _ in named]
        self.weights = [float(weight) for _, weight, _ in named]
        self.rewards = nn.ModuleList([reward for _, _, reward in named])
        self.normalize = list(normalize) or [False] * len(self.labels)
        if normalize_decay is None or isinstance(normalize_decay, (int, float)):
            normalize_decay = [normalize_decay] * len(self.labels)
        self.decays = [float(d) if d else None for d in normalize_decay]  # None: all-history
        self.stats: dict[str, list] = {label: [0, 0.0, 0.0, 0] for label in self.labels}

    def _stat(self, label: str) -> list:
        stat = self.stats[label]
        if len(stat) == 3:  # legacy [count, mean, M2] (Welford) from an older checkpoint
            count, mean, m2 = stat
            stat = self.stats[label] = [int(count), float(mean), float(m2) / (count - 1) if count > 1 else 0.0,
                                        1 if count else 0]
        return stat

    def _ready(self, i: int) -> bool:
        """Running statistics exist (EMA: one update; all-history: two images)."""
        stat = self._stat(self.labels[i])
        return stat[3] >= 1 if self.decays[i] else stat[0] >= 2

    def forward(self, images: torch.Tensor, prompts: Sequence[str],
                gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {label: reward(images, prompts) for label, reward in zip(self.labels, self.rewards)}
        fresh = [i for i, norm in enumerate(self.normalize) if norm and not self._ready(i)]
        batch_stats = {}
        if fresh:  # no running statistics yet: this batch's own (all ranks' with `gather`)
            block = torch.stack([parts[self.labels[i]].detach().float() for i in fresh], dim=1)
            if gather is not None:
                block = gather(block).to(block.device)
            for j, i in enumerate(fresh):
                column = block[:, j]
                std = column.std() if len(column) > 1 else torch.ones((), device=column.device)
                batch_stats[i] = (column.mean(), std)
        total = 0
        for i, (label, w, norm) in enumerate(zip(self.labels, self.weights, self.normalize)):
            scores = parts[label]
            if norm:
                if i in batch_stats:
                    mean, std = batch_stats[i]
                else:
                    _, mean, var, _ = self._stat(label)
                    std = math.sqrt(max(var, 0.0))
                    std = std if std > 0 else 1.0  # a single image so far: no spread to divide by
                scores = (scores - mean) / (std + 1e-6)
            total = total + w * scores
        return total, parts

    def update_stats(self, scores: torch.Tensor) -> None:
        """Fold one step's (num_images × num_components) block of raw scores (all ranks) in."""
        scores = torch.as_tensor(scores, dtype=torch.float64)
        for label, decay, column in zip(self.labels, self.decays, scores.T):
            n = len(column)
            if n == 0:
                continue
            count, mean, var, steps = self._stat(label)
            mean_b = float(column.mean())
            var_b = float(column.var()) if n > 1 else 0.0
            if decay:  # EMA over steps
                if steps == 0:
                    mean, var = mean_b, var_b
                else:
                    delta = mean_b - mean
                    var = decay * var + (1 - decay) * var_b + decay * (1 - decay) * delta ** 2
                    mean = decay * mean + (1 - decay) * mean_b
            else:  # exact all-history mean and unbiased variance (Chan's parallel Welford update)
                m2 = var * (count - 1) if count > 1 else 0.0
                total = count + n
                delta = mean_b - mean
                mean += delta * n / total
                m2 += var_b * (n - 1) + delta ** 2 * count * n / total
                var = m2 / (total - 1) if total > 1 else 0.0
            self.stats[label] = [count + n, mean, var, steps + 1]
