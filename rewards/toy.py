"""Rewards of the toy world: learned (differentiable) and the analytic judge (evaluation only).

    rewards:
      - {name: toy_count}                      # −|soft count − target|: a CNN's density map, summed
      - {name: toy_color, color: red}          # share of the image a CNN sees in red (default: the prompt's)
    eval_rewards:
      - {name: toy_count_exact}                # 1 if the judge counts exactly the prompt's number
      - {name: toy_color_match}                # 1 if the judge's majority colour is the prompt's
      - {name: toy_count_judge}                # −|judge count − target|: the gold twin of toy_count
      - {name: toy_shape_match}                # 1 if the objects' majority shape is the prompt's
      - {name: toy_background_match}           # 1 if the background is the prompt's

Gold beside proxy: `toy_count_judge` is on `toy_count`'s scale, so the two curves share a chart, and
with both configured every evaluation logs `eval/proxy_error`, the mean |soft count − judge count| on
the evaluation images: the learned reward being fooled, directly. The same pairing for your own
reward: a learned reward in `rewards`, an independent gold reward on held-out prompts in
`eval_rewards`, and `trainer.best_metric` naming the gold one.

`toy_count` and `toy_color` are small CNNs trained on the generator's ground truth (like the
paper's detector and aesthetic predictors; `alignprop toy-world build-rewards`), shipped beside
the toy-world pipeline. The judge (`alignprop.platform.toy_world.judge`) reads pixels without a learned
model; scored on held-out prompts beside a learned reward, it shows over-optimisation (the learned
reward rises while the true metric falls). Targets come from the option, else from the prompt (the
toy grammar "two red circles on a white background", or the first count / colour word in it).
`toy_count` and `toy_color` take `dtype` (`auto` default: the worker's compute dtype, float32
outside a worker; or float32, bfloat16, float16) for the CNN; resizing and scores stay float32.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..platform.toy_world.judge import COLOUR_NAMES, judge
from ..platform.toy_world import COLOURS, COUNTS, SHIPPED_DIR, SIZE, parse_caption, prompt_colour, prompt_count
from ..platform.toy_world.scenes import BACKGROUNDS, SHAPES
from .base import DTYPE_CHOICES, Reward, read_state_dict

REWARD_DIR = SHIPPED_DIR / "rewards"


class ToyNet(nn.Module):
    """Fully convolutional: B×3×H×W in [0, 1] (resized to 32×32) → B×C×16×16 maps. Receptive
    field 17 px: a whole object (8–12 px) and its surroundings."""

    def __init__(self, out_channels: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, out_channels, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.body((x * 2 - 1).to(self.body[0].weight.dtype)).float()  # float32 maps at any weight dtype


def count_density(net: ToyNet, images: torch.Tensor) -> torch.Tensor:
    """B×16×16 non-negative density; its sum is the soft count."""
    return F.softplus(net(images)[:, 0])


def colour_probs(net: ToyNet, images: torch.Tensor) -> torch.Tensor:
    """B×(len(COLOURS) + 1)×16×16 per-cell probabilities of each colour, background last."""
    return net(images).softmax(1)


def load_toy_net(path: Optional[str], kind: str) -> ToyNet:
    """The shipped (or given) count or colour CNN; safetensors or a weights-only torch file."""
    file = path or str(REWARD_DIR / f"toy_{kind}.safetensors")
    net = ToyNet(1 if kind == "count" else len(COLOURS) + 1)
    try:
        state = read_state_dict(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"toy_{kind}: no weights at {file}; rebuild them with `alignprop toy-world "
                                "build-rewards "
                                f"{SHIPPED_DIR}` or set the reward's `model` option") from None
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net


def _target_error(spec: dict[str, Any]) -> Optional[tuple[str, str]]:
    target = spec.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        return "target", f"got {target!r}; accepted: an integer >= 0, or leave it out to read the prompt"
    return None


def _wanted(fixed: Any, read, prompts: Sequence[str], reward: str, option: str, accepted: str) -> list:
    """`fixed` (the reward's option) for every prompt, else what `read` finds in each; a one-line
    ValueError naming the first prompt where it finds nothing."""
    values = [fixed] * len(prompts) if fixed is not None else [read(p) for p in prompts]
    missing = [p for p, v in zip(prompts, values) if v is None]
    if missing:
        raise ValueError(f"{reward}: prompt {missing[0]!r} names no {accepted}; set the reward's `{option}` option")
    return values


def _wanted_counts(target: Optional[int], prompts: Sequence[str], reward: str) -> list[int]:
    return _wanted(target, prompt_count, prompts, reward, "target", f"count ({', '.join(COUNTS)})")


def _wanted_colours(color: Optional[str], prompts: Sequence[str], reward: str) -> list[str]:
    return _wanted(color, prompt_colour, prompts, reward, "color", f"colour ({', '.join(COLOURS)})")


class ToyCount(Reward):
    """−|soft count − target|: the toy world's `object_count`, a CNN density map summed."""

    name = "toy_count"
    needs = "the toy world's count CNN (shipped in platform/toy_world/pretrained/rewards; `model` for another)"
    choices = {"dtype": DTYPE_CHOICES}

    def __init__(self, target: Optional[int] = None, model: Optional[str] = None, dtype: str = "auto"):
        super().__init__()
        self.target = target
        self.net = load_toy_net(model, "count")
        self.cast(dtype)

    @classmethod
    def spec_error(cls, spec: dict[str, Any]) -> Optional[tuple[str, str]]:
        return _target_error(spec)

    def count(self, images: torch.Tensor) -> torch.Tensor:
        return count_density(self.net, images).sum((1, 2))

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = _wanted_counts(self.target, prompts, self.name)
        return -(self.count(images) - torch.tensor(wanted, dtype=torch.float32, device=images.device)).abs()


class ToyColor(Reward):
    """The share of the image (0–1) a CNN sees in the target colour."""

    name = "toy_color"
    needs = "the toy world's colour CNN (shipped in platform/toy_world/pretrained/rewards; `model` for another)"
    choices = {"color": tuple(COLOURS), "dtype": DTYPE_CHOICES}

    def __init__(self, color: Optional[str] = None, model: Optional[str] = None, dtype: str = "auto"):
        super().__init__()
        self.color = color
        self.net = load_toy_net(model, "color")
        self.cast(dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = _wanted_colours(self.color, prompts, self.name)
        index = torch.tensor([list(COLOURS).index(w) for w in wanted], device=images.device)
        share = colour_probs(self.net, images).mean((2, 3))
        return share.gather(1, index[:, None])[:, 0]


class ToyCountExact(Reward):
    """1.0 where the analytic judge counts exactly the target number of objects, else 0.0."""

    name = "toy_count_exact"
    needs = "nothing (analytic judge of the toy world: connected components of coloured pixels)"
    differentiable = False

    def __init__(self, target: Optional[int] = None):
        super().__init__()
        self.target = target

    @classmethod
    def spec_error(cls, spec: dict[str, Any]) -> Optional[tuple[str, str]]:
        return _target_error(spec)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = _wanted_counts(self.target, prompts, self.name)
        counts = judge(images).count
        return (counts == torch.tensor(wanted)).float().to(images.device)


class ToyColorMatch(Reward):
    """1.0 where the majority colour of the object pixels is the target colour, else 0.0."""

    name = "toy_color_match"
    needs = "nothing (analytic judge of the toy world: hue vote of the coloured pixels)"
    differentiable = False
    choices = {"color": tuple(COLOURS)}

    def __init__(self, color: Optional[str] = None):
        super().__init__()
        self.color = color

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = _wanted_colours(self.color, prompts, self.name)
        found = judge(images).colour
        return torch.tensor([float(f == w) for f, w in zip(found, wanted)], device=images.device)


class ToyCountJudge(ToyCountExact):
    """−|judge count − target|: the analytic judge's count on `toy_count`'s scale (gold beside proxy)."""

    name = "toy_count_judge"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = torch.tensor(_wanted_counts(self.target, prompts, self.name), dtype=torch.float32)
        return -(judge(images).count.float() - wanted).abs().to(images.device)


def _caption_field(prompts: Sequence[str], reward: str, field: str, accepted: Sequence[str]) -> list[str]:
    """The shape or background each prompt asks for: the grammar's, else the first such word in it."""
    def read(prompt: str) -> Optional[str]:
        caption = parse_caption(prompt)
        if caption is not None:
            return getattr(caption, field)
        words = [w.removesuffix("s") for w in re.findall(r"[a-z]+", prompt.lower())]
        return next((w for w in words if w in accepted), None)

    return _wanted(None, read, prompts, reward, field, f"{field} ({', '.join(accepted)})")


class ToyShapeMatch(Reward):
    """1.0 where the majority shape of the judge's objects is the prompt's (or `shape`), else 0.0."""

    name = "toy_shape_match"
    needs = "nothing (analytic judge of the toy world: how much of its box each object fills)"
    differentiable = False
    choices = {"shape": SHAPES}

    def __init__(self, shape: Optional[str] = None):
        super().__init__()
        self.shape = shape

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = [self.shape] * len(prompts) if self.shape else _caption_field(prompts, self.name, "shape", SHAPES)
        found = judge(images).shape
        return torch.tensor([float(f == w) for f, w in zip(found, wanted)], device=images.device)


class ToyBackgroundMatch(Reward):
    """1.0 where the judge's background (the nearest of white, black, gray) is the prompt's, else 0.0."""

    name = "toy_background_match"
    needs = "nothing (analytic judge of the toy world: the median of the image's border)"
    differentiable = False
    choices = {"background": tuple(BACKGROUNDS)}

    def __init__(self, background: Optional[str] = None):
        super().__init__()
        self.background = background

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = ([self.background] * len(prompts) if self.background
                  else _caption_field(prompts, self.name, "background", tuple(BACKGROUNDS)))
        found = judge(images).background
        return torch.tensor([float(f == w) for f, w in zip(found, wanted)], device=images.device)


@torch.no_grad()
def proxy_errors(rewards, eval_rewards, images: torch.Tensor) -> dict[str, float]:
    """The learned toy rewards checked against the judge on the same images, where a run has both:
    `proxy_error` = mean |soft count − judge count| (a `toy_count` reward beside `toy_count_exact` or
    `toy_count_judge`), `proxy_error_color` = the share of images whose majority object colour the
    colour CNN and the judge disagree on (`toy_color` beside `toy_color_match`). Empty otherwise."""
    nets = {type(r): r.net for r in (rewards.rewards if rewards is not None else ()) if type(r) in (ToyCount, ToyColor)}
    learned = set(nets)
    gold = {type(r) for r in (eval_rewards.rewards if eval_rewards is not None else ())}
    out, verdict = {}, None
    if ToyCount in learned and gold & {ToyCountExact, ToyCountJudge}:
        verdict = judge(images)
        soft = count_density(nets[ToyCount], images.float()).sum((1, 2))
        out["proxy_error"] = float((soft - verdict.count.to(soft.device).float()).abs().mean())
    if ToyColor in learned and ToyColorMatch in gold:
        verdict = verdict or judge(images)
        seen = colour_probs(nets[ToyColor], images.float()).mean((2, 3))[:, :-1].argmax(1).tolist()
        out["proxy_error_color"] = sum(COLOUR_NAMES[i] != c for i, c in zip(seen, verdict.colour)) / len(seen)
    return out
