"""The toy world's analytic judge: object count and colour read off decoded pixels, no learned model.

    verdict = judge(images)                  # images: B×3×H×W in [0, 1]
    verdict.count, verdict.colour            # per image: components, majority colour name
    verdict.shape, verdict.background        # majority shape of the objects, nearest background name
    evaluate(pipe, prompts, seeds=(0, 1))    # quality bar: colour match, exact / ±1 count

The background colour is the median of the image's outermost ring of pixels (objects keep off the
border). An object pixel is one at least DIST_MIN (RGB distance, [0, 1] scale) from the background
and with chroma (max − min of RGB) at least CHROMA_MIN: the world's objects are saturated
colours, so a tinted or blotchy background is not mistaken for objects, and neutral specks are
not objects. Mixing a colour with a neutral keeps its hue, so anti-aliased and blurred edges vote
for the right colour: the image's colour is the chroma-weighted vote of its object pixels' nearest
palette hue. The count is the number of 8-connected components of object pixels with an area of
at least MIN_AREA pixels per 32×32 (smaller specks are noise, not objects). An object's shape is read
from how much of its bounding box it fills (a square all of it, a circle π/4, a triangle half:
SHAPE_FILL); the image's shape is the objects' majority. The background is the palette background
(white, black, gray) nearest to the ring's median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .scenes import BACKGROUNDS, COLOURS, parse_caption

DIST_MIN = 0.3
CHROMA_MIN = 0.15
# pixels per 32×32 image, scaled with the image area. The smallest object (an 8-pixel triangle) has
# 32 object pixels (measured on 1000 generated images); a component under 12 is a fragment. At 4, the fringe specks a
# sampled image can
# have along edges counted as objects (e.g. six in a clean picture of four circles).
MIN_AREA = 12
COLOUR_NAMES = tuple(COLOURS)
# fill of the bounding box above which an object is a square, else above which a circle, else a triangle;
# the midpoints of what 600 rendered scenes of every caption measured: square 1.0, circle 0.75-0.88,
# triangle 0.50-0.63 (the judge then reads every one of them right: tests/test_toy_world.py)
SHAPE_FILL = (0.94, 0.69)


def _hue(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hue in degrees [0, 360), chroma) per pixel of B×3×H×W images in [0, 1]."""
    r, g, b = images.unbind(1)
    top, _ = images.max(1)
    chroma = top - images.min(1).values
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(top == r, ((g - b) / safe) % 6,
                      torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    return hue % 360.0, chroma


def _palette_hues() -> torch.Tensor:
    rgb = torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=torch.float32).div(255).T[None, :, :, None]
    return _hue(rgb)[0].flatten()  # one hue per palette colour


def nearest_colour(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into COLOUR_NAMES of each pixel's nearest palette hue, chroma): B×H×W each."""
    hue, chroma = _hue(images.float())
    diff = (hue[..., None] - _palette_hues().to(hue.device)).abs()
    diff = torch.minimum(diff, 360.0 - diff)
    return diff.argmin(-1), chroma


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a B×H×W bool mask (0 = background), by min-label propagation."""
    b, h, w = mask.shape
    big = float(h * w + 1)
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, h, w).expand(b, h, w)
    labels = torch.where(mask, ids, torch.full_like(ids, big))
    while True:
        spread = -F.max_pool2d(-labels[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(mask, torch.minimum(labels, spread), labels)
        if torch.equal(new, labels):
            return torch.where(mask, labels, torch.zeros_like(labels)).long()
        labels = new


@dataclass
class Verdict:
    count: torch.Tensor  # B, objects found
    colour: list[str | None]  # majority colour of the object pixels (None: no object pixels)
    colour_share: torch.Tensor  # B×len(COLOUR_NAMES): chroma-weighted share of each colour
    object_fraction: torch.Tensor  # B, share of the image that is object pixels
    shape: list[str | None] = None  # majority shape of the objects (None: no object)
    background: list[str] = None  # the nearest palette background


def background(images: torch.Tensor) -> torch.Tensor:
    """B×3: the per-channel median of each image's outermost ring of pixels."""
    ring = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1)
    return ring.median(dim=-1).values


def object_mask(images: torch.Tensor) -> torch.Tensor:
    """B×H×W: pixels far enough from the background and coloured enough to belong to an object."""
    _, chroma = _hue(images)
    far = (images - background(images)[..., None, None]).norm(dim=1) >= DIST_MIN
    return far & (chroma >= CHROMA_MIN)


@torch.no_grad()
def judge(images: torch.Tensor, min_area: int = MIN_AREA) -> Verdict:
    """Count and colour of B×3×H×W images in [0, 1] (no gradient)."""
    images = images.detach().float().clamp(0, 1)
    index, chroma = nearest_colour(images)
    mask = object_mask(images)
    labels = components(mask)
    area_min = max(1, round(min_area * images.shape[-2] * images.shape[-1] / 1024))
    counts, shapes = [], []
    for lab in labels:
        ids, sizes = torch.unique(lab[lab > 0], return_counts=True)
        kept = ids[sizes >= area_min]
        counts.append(len(kept))
        shapes.append(_majority_shape(lab, kept))
    weights = torch.where(mask, chroma, torch.zeros_like(chroma))
    share = torch.zeros(len(images), len(COLOUR_NAMES), device=images.device)
    share.scatter_add_(1, index.flatten(1), weights.flatten(1))
    total = share.sum(1, keepdim=True)
    colour = [COLOUR_NAMES[int(i)] if t > 0 else None for i, t in zip(share.argmax(1), total[:, 0])]
    return Verdict(torch.tensor(counts), colour, share / total.clamp_min(1e-8), mask.float().mean((1, 2)),
                   shapes, background_names(images))


def object_shape(component: torch.Tensor) -> str:
    """square, circle or triangle: how much of its bounding box an H×W bool component fills."""
    rows, cols = component.any(1).nonzero()[:, 0], component.any(0).nonzero()[:, 0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = float(component.sum()) / float(box)
    return "square" if fill >= SHAPE_FILL[0] else "circle" if fill >= SHAPE_FILL[1] else "triangle"


def _majority_shape(labels: torch.Tensor, ids: torch.Tensor) -> str | None:
    votes = [object_shape(labels == i) for i in ids.tolist()]
    return max(sorted(set(votes)), key=votes.count) if votes else None


def background_names(images: torch.Tensor) -> list[str]:
    """The palette background nearest (RGB distance) to each image's ring median."""
    names = tuple(BACKGROUNDS)
    palette = torch.tensor([BACKGROUNDS[n] for n in names], dtype=torch.float32, device=images.device) / 255
    return [names[int(i)] for i in torch.cdist(background(images), palette).argmin(1)]


@dataclass
class QualityReport:
    prompts: list[str]  # one per sample (prompt × seed)
    seeds: list[int]
    counts: list[int]
    colours: list[str | None]
    images: torch.Tensor  # N×3×H×W in [0, 1]

    def _truth(self):
        return [parse_caption(p) for p in self.prompts]

    @property
    def colour_match(self) -> float:
        return sum(c is not None and c == t.colour for c, t in zip(self.colours, self._truth())) / len(self.prompts)

    @property
    def count_exact(self) -> float:
        return sum(c == t.count for c, t in zip(self.counts, self._truth())) / len(self.prompts)

    @property
    def count_within_one(self) -> float:
        return sum(abs(c - t.count) <= 1 for c, t in zip(self.counts, self._truth())) / len(self.prompts)

    def summary(self) -> str:
        return (f"{len(set(self.prompts))} prompts × {len(set(self.seeds))} seeds = {len(self.prompts)} samples: "
                f"colour match {self.colour_match:.1%}, count exact {self.count_exact:.1%}, "
                f"count ±1 {self.count_within_one:.1%}")


@torch.no_grad()
def evaluate(pipe, prompts: Sequence[str], seeds: Sequence[int] = (0, 1), steps: int = 25,
             guidance: float = 5.0, batch_size: int = 64) -> QualityReport:
    """Sample every prompt with every seed through the diffusers pipeline (DDIM, CFG) and judge it.

    Each sample has its own generator seeded by (seed, prompt index), so results do not depend on
    the batch size. Prompts must follow the toy grammar (`parse_caption`)."""
    bad = [p for p in prompts if parse_caption(p) is None]
    if bad:
        raise ValueError(f"prompt {bad[0]!r} does not follow the toy grammar '{{count}} {{colour}} {{shape}}[s] on a "
                         f"{{background}} background'")
    jobs = [(p, s, i) for s in seeds for i, p in enumerate(prompts)]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(s * 1_000_003 + i) for _, s, i in chunk]
        out = pipe([p for p, _, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="pt")
        images.append(out.images.float().cpu())
    images = torch.cat(images)
    verdict = judge(images)
    return QualityReport([p for p, _, _ in jobs], [s for _, s, _ in jobs], verdict.count.tolist(), verdict.colour,
                         images)


def grid(images: torch.Tensor, columns: int = 8, scale: int = 4, captions: Sequence[str] | None = None):
    """A PIL image of the samples, upscaled (nearest) `scale`×, with a caption under each tile."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    text_h = 22 if captions else 0
    tile_w, tile_h = w * scale, h * scale + text_h
    canvas = Image.new("RGB", (columns * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for k in range(n):
        x, y = (k % columns) * tile_w, (k // columns) * tile_h
        canvas.paste(Image.fromarray(pixels[k]).resize((tile_w, h * scale), Image.Resampling.NEAREST), (x, y))
        if captions:
            words = captions[k].replace(" background", "").split(" on a ")
            draw.text((x + 2, y + h * scale + 1), words[0], fill=(0, 0, 0))
            draw.text((x + 2, y + h * scale + 11), f"on {words[1]}" if len(words) > 1 else "", fill=(90, 90, 90))
    return canvas
