"""The `Reward` interface and the weighted sum that AlignProp maximises."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Reward(nn.Module):
    """A differentiable score per image.

    Subclasses implement `score(images, prompts) -> Tensor[B]` with `images` a float tensor in
    [0, 1] of shape B×3×H×W on the reward's device. Model-backed rewards do their own
    preprocessing on tensors (resize, normalise) so gradients flow back to the pixels; their
    weights are frozen (`requires_grad_(False)`, eval mode) by `freeze()`.
    """

    name: str = "reward"
    needs: str = "nothing (analytic)"
    differentiable: bool = True  # False: a metric for eval_rewards only  # what the reward loads: shown by `alignprop rewards list`

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
    with the scores of all ranks (`update_stats`), so every rank normalises identically; before
    the first update a batch is normalised by its own statistics.
    """

    def __init__(self, named: Sequence[tuple[str, float, Reward]], normalize: Sequence[bool] = ()):
        super().__init__()
        self.labels = [label for label, _, _ in named]
        self.weights = [float(weight) for _, weight, _ in named]
        self.rewards = nn.ModuleList([reward for _, _, reward in named])
        self.normalize = list(normalize) or [False] * len(self.labels)
        self.stats = {label: [0, 0.0, 0.0] for label in self.labels}  # count, mean, M2 (Welford)

    def _normalized(self, label: str, scores: torch.Tensor) -> torch.Tensor:
        count, mean, m2 = self.stats[label]
        if count < 2:
            detached = scores.detach()
            mean, std = detached.mean(), detached.std() if len(detached) > 1 else torch.ones(())
        else:
            std = (m2 / (count - 1)) ** 0.5
        return (scores - mean) / (std + 1e-6)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {label: reward(images, prompts) for label, reward in zip(self.labels, self.rewards)}
        total = sum(
            w * (self._normalized(label, parts[label]) if norm else parts[label])
            for label, w, norm in zip(self.labels, self.weights, self.normalize)
        )
        return total, parts

    def update_stats(self, scores: torch.Tensor) -> None:
        """Fold a (num_images × num_components) block of raw scores into the running statistics."""
        for label, column in zip(self.labels, scores.T.tolist()):
            stat = self.stats[label]
            for x in column:
                stat[0] += 1
                delta = x - stat[1]
                stat[1] += delta / stat[0]
                stat[2] += delta * (x - stat[1])


_COMBINATION_KEYS = ("name", "weight", "label", "normalize")  # read by the combination, not the reward


def _registry() -> dict[str, type[Reward]]:
    from alignprop.rewards.aesthetic import Aesthetic
    from alignprop.rewards.analytic import Brightness, Colorfulness, Saturation
    from alignprop.rewards.compressibility import Compressibility, JpegSize
    from alignprop.rewards.object_count import ObjectCount
    from alignprop.rewards.preference import HPSv2, PickScore

    return {
        "brightness": Brightness, "saturation": Saturation, "colorfulness": Colorfulness,
        "aesthetic": Aesthetic, "compressibility": Compressibility, "jpeg_size": JpegSize,
        "object_count": ObjectCount, "hpsv2": HPSv2, "pickscore": PickScore,
    }


def _options(cls: type[Reward]) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


def validate_reward_specs(specs: Sequence[Any], field: str, allow_empty: bool) -> None:
    """Check `[{name, weight, ...options}]` without building anything; one-line ConfigError."""
    from alignprop.platform.config import ConfigError

    registry = _registry()
    if not specs and not allow_empty:
        raise ConfigError(f"{field}: empty; accepted: a list of {{name, weight, ...options}} with name in {', '.join(registry)}")
    labels = set()
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'name' key; accepted names: {', '.join(registry)}")
        if spec["name"] not in registry:
            raise ConfigError(f"{where}.name: unknown reward {spec['name']!r}; accepted: {', '.join(registry)}")
        if field == "rewards" and not registry[spec["name"]].differentiable:
            raise ConfigError(f"{where}.name: {spec['name']!r} has no gradient; accepted in eval_rewards only (train on its differentiable twin, e.g. compressibility)")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}.weight: got {weight!r}; accepted: a number")
        label = spec.get("label", spec["name"])
        if label in labels:
            raise ConfigError(f"{where}.label: {label!r} appears twice; give each repeated reward a distinct label")
        labels.add(label)
        accepted = _options(registry[spec["name"]])
        for key in spec:
            if key not in _COMBINATION_KEYS and key not in accepted:
                raise ConfigError(f"{where}.{key}: unknown option of reward {spec['name']!r}; accepted: {', '.join([*_COMBINATION_KEYS[1:], *accepted])}")
        if not isinstance(spec.get("normalize", False), bool):
            raise ConfigError(f"{where}.normalize: got {spec['normalize']!r}; accepted: true, false")


def check_reward_files(specs: Sequence[dict[str, Any]], field: str) -> None:
    """The weights each reward names exist here (on the driver: the head node of a cluster)."""
    for i, spec in enumerate(specs):
        for key in _WEIGHT_OPTIONS:
            _check_weights_location(spec.get(key), f"{field}[{i}].{key}", required_file=key in _REQUIRED_FILES)


def _check_weights_location(value: Any, where: str, required_file: bool) -> None:
    """A local weights path must exist (checked on the driver, not found missing inside a worker)."""
    from pathlib import Path

    from alignprop.platform.config import ConfigError

    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: got {value!r}; accepted: a local path or a hub id <org>/<name>")
    path = Path(value).expanduser()
    looks_local = required_file or path.is_absolute() or value.startswith((".", "~")) or value.count("/") != 1
    if looks_local and not path.exists():
        accepted = "an existing local file" if required_file else "an existing local path or a hub id <org>/<name>"
        raise ConfigError(f"{where}: no such file or directory {value!r}; accepted: {accepted}")


def build_reward(spec: dict[str, Any]) -> Reward:
    options = {k: v for k, v in spec.items() if k not in _COMBINATION_KEYS}
    return _registry()[spec["name"]](**options).freeze()


def build_rewards(specs: Sequence[dict[str, Any]]) -> WeightedRewards:
    named = [(s.get("label", s["name"]), s.get("weight", 1.0), build_reward(s)) for s in specs]
    return WeightedRewards(named, normalize=[bool(s.get("normalize", False)) for s in specs])


_WEIGHT_OPTIONS = ("model", "clip_model", "processor", "tokenizer", "config", "mlp_path", "checkpoint")
_REQUIRED_FILES = ("mlp_path", "checkpoint")  # weights that no hub id provides: the user must set them


def _located(value: Any) -> str:
    """'found' if a local path exists or a hub id is in the local HF cache, else 'missing'."""
    from pathlib import Path

    if Path(str(value)).expanduser().exists():
        return "found"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(value), "config.json")
        return "found (hub cache)" if isinstance(hit, str) else "missing"
    except Exception:  # not a valid repo id either
        return "missing"


def describe_rewards() -> list[dict[str, str]]:
    """For `alignprop rewards list`: each reward, what it loads, and whether its default weights are here."""
    rows = []
    for name, cls in _registry().items():
        weights = []
        for option, param in _options(cls).items():
            if option not in _WEIGHT_OPTIONS:
                continue
            default = param.default
            if default in (None, inspect.Parameter.empty):
                status = "not set (required)" if option in _REQUIRED_FILES else "built in"
            else:
                status = f"{default}: {_located(default)}"
            weights.append(f"{option}={status}")
        rows.append({"name": name, "needs": cls.needs, "weights": "; ".join(weights) or "none needed"})
    return rows
