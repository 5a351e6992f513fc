"""The toy world: seeded 32×32 RGB images of 1–4 coloured shapes on a plain background, captioned
by one grammar, with the ground truth of every image.

    scene = sample_scene(np.random.default_rng(0), TRAIN_CAPTIONS)
    scene.caption            # 'two red circles on a white background'
    scene.count, scene.colours, scene.shapes, scene.boxes    # the ground truth
    image = render(scene)    # uint8 32×32×3
    parse_caption("three blue squares on a gray background")  # → Caption(3, 'blue', 'square', 'gray')

Grammar: `{count} {colour} {shape}[s] on a {background} background` with count one–four, colours
red, yellow, green, cyan, blue, purple (hues ~55° apart), shapes circle, square, triangle, and
neutral backgrounds white, black, gray (so an object pixel is a pixel with chroma: see
`judge.py`). The 216 captions are split once, by a fixed rule, into 120 for pretraining
(`TRAIN_CAPTIONS`) and 96 held out (`HELDOUT_CAPTIONS`) that the pipeline never sees; every pair of
attribute values (e.g. "two … circles", "purple … on a black") still occurs in the training half.

`alignprop toy-world build DIR` pretrains the tiny SD-shaped pipeline on this world
(`pretrain.py`); `alignprop toy-world path` prints the shipped one.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHIPPED_DIR = Path(__file__).parent / "pretrained"  # the pretrained pipeline (+ reward models)
SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: anti-aliased edges
COUNTS = ("one", "two", "three", "four")
COLOURS = {  # name → sRGB; saturated (chroma ≥ 0.58), hues ≈ 0, 52, 125, 180, 235, 282°
    "red": (230, 25, 35), "yellow": (245, 215, 20), "green": (30, 180, 40),
    "cyan": (20, 210, 210), "blue": (30, 50, 235), "purple": (160, 40, 210),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
OBJECT_SIZE = (8, 12)  # side of an object's bounding box in pixels, inclusive range
GAP = 3  # at least this many background pixels between two objects' boxes (and 1 to the border)
SPLIT_SEED = 8  # the held-out split is part of the world's definition, not of a build
HELDOUT_SIZE = 96
CAPTION_RE = re.compile(r"^(one|two|three|four) ([a-z]+) ([a-z]+?)(s?) on a ([a-z]+) background$")


@dataclass(frozen=True)
class Caption:
    count: int
    colour: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{COUNTS[self.count - 1]} {self.colour} {self.shape}{plural} on a {self.background} background"


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: every object's colour, shape and box (x0, y0, side) in pixels."""

    caption_: Caption
    boxes: tuple[tuple[int, int, int], ...]

    @property
    def caption(self) -> str:
        return self.caption_.text

    @property
    def count(self) -> int:
        return len(self.boxes)

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.caption_.colour,) * self.count

    @property
    def shapes(self) -> tuple[str, ...]:
        return (self.caption_.shape,) * self.count

    @property
    def background(self) -> str:
        return self.caption_.background


def vocabulary() -> frozenset[str]:
    """Every word of the caption grammar: all the toy world's text encoder ever saw."""
    return frozenset({*COUNTS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *BACKGROUNDS, "on", "a", "background"})


def vocabulary_warning(prompts: Sequence[str]) -> str | None:
    """One warning line naming the prompts' words outside the grammar (the pipeline draws nothing for
    them), or None when every word is known."""
    outside = sorted({w for p in prompts for w in re.findall(r"[a-z]+", p.lower())} - vocabulary())
    if not outside:
        return None
    shown = ", ".join(outside[:8]) + (f" and {len(outside) - 8} more" if len(outside) > 8 else "")
    return (f"[alignprop] warning: the toy world's pipeline knows only its caption grammar ({len(vocabulary())} "
            f"words, as in '{Caption(2, 'red', 'circle', 'white').text}'); these words mean nothing "
            f"to it: {shown}")


def parse_caption(text: str) -> Caption | None:
    """The caption's attributes, or None when `text` does not follow the grammar exactly."""
    match = CAPTION_RE.match(text.strip().lower())
    if match is None:
        return None
    count_word, colour, shape, plural, background = match.groups()
    count = COUNTS.index(count_word) + 1
    if colour not in COLOURS or shape not in SHAPES or background not in BACKGROUNDS or (plural == "s") != (count > 1):
        return None
    return Caption(count, colour, shape, background)


def prompt_count(text: str) -> int | None:
    """The count a prompt asks for: the grammar's, else the first count word in it (one–four)."""
    caption = parse_caption(text)
    if caption is not None:
        return caption.count
    words = re.findall(r"[a-z]+", text.lower())
    return next((COUNTS.index(w) + 1 for w in words if w in COUNTS), None)


def prompt_colour(text: str) -> str | None:
    """The colour a prompt asks for: the grammar's, else the first palette colour word in it."""
    caption = parse_caption(text)
    if caption is not None:
        return caption.colour
    return next((w for w in re.findall(r"[a-z]+", text.lower()) if w in COLOURS), None)


def all_captions() -> list[Caption]:
    return [Caption(n, c, s, b) for n, c, s, b in itertools.product(range(1, 5), COLOURS, SHAPES, BACKGROUNDS)]


def _pairs(captions: Sequence[Caption]) -> set[tuple]:
    """Every (attribute i, value, attribute j, value) pair that some caption shows."""
    out = set()
    for c in captions:
        values = (c.count, c.colour, c.shape, c.background)
        out |= {(i, values[i], j, values[j]) for i in range(4) for j in range(i + 1, 4)}
    return out


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[Caption, ...], tuple[Caption, ...]]:
    """(train, held-out): a seeded random 96 of the 216 captions held out, redrawn (deterministically)
    until the training half shows every pair of attribute values."""
    captions = all_captions()
    full = _pairs(captions)
    for attempt in itertools.count():
        order = np.random.default_rng([SPLIT_SEED, attempt]).permutation(len(captions))
        held = set(order[:HELDOUT_SIZE].tolist())
        train = [c for i, c in enumerate(captions) if i not in held]
        if _pairs(train) == full:  # held-out in shuffled order: any prefix mixes counts and colours
            return tuple(train), tuple(captions[i] for i in order[:HELDOUT_SIZE])
    raise AssertionError("unreachable")


TRAIN_CAPTIONS: tuple[Caption, ...] = _split()[0]
HELDOUT_CAPTIONS: tuple[Caption, ...] = _split()[1]


def _place(rng: np.random.Generator, count: int) -> tuple[tuple[int, int, int], ...]:
    """`count` square boxes (x0, y0, side) inside the image, pairwise ≥ GAP pixels apart."""
    while True:
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200):
            side = int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1))
            x0, y0 = (int(v) for v in rng.integers(1, SIZE - side, size=2))
            if all(x0 >= x + s + GAP or x >= x0 + side + GAP or y0 >= y + s + GAP or y >= y0 + side + GAP
                   for x, y, s in boxes):
                boxes.append((x0, y0, side))
                if len(boxes) == count:
                    return tuple(boxes)
        # rare: a crowded first draw left no room; start again from the same stream


def caption_probs(captions: Sequence[Caption], count_weights: Sequence[float]) -> np.ndarray:
    """Probability of each caption so that count k's share is ∝ count_weights[k − 1], whatever the
    number of captions with that count."""
    weights = np.array([count_weights[c.count - 1] for c in captions], dtype=np.float64)
    per_count = {k: sum(c.count == k for c in captions) for k in range(1, len(COUNTS) + 1)}
    weights /= np.array([per_count[c.count] for c in captions])
    return weights / weights.sum()


def sample_scene(rng: np.random.Generator, captions: Sequence[Caption] = TRAIN_CAPTIONS,
                 probs: np.ndarray | None = None) -> Scene:
    """A caption drawn from `captions` (uniformly, or with `probs`: `caption_probs`) and a random
    layout that matches it."""
    if probs is None:
        caption = captions[int(rng.integers(len(captions)))]
    else:
        caption = captions[int(rng.choice(len(captions), p=probs))]
    return Scene(caption, _place(rng, caption.count))


def scene_for(caption: Caption, rng: np.random.Generator) -> Scene:
    return Scene(caption, _place(rng, caption.count))


def render(scene: Scene) -> np.ndarray:
    """The scene as a SIZE×SIZE×3 uint8 image (drawn at SUPERSAMPLE× and box-filtered)."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.caption_.colour]
    for x0, y0, side in scene.boxes:
        box = (x0 * k, y0 * k, (x0 + side) * k - 1, (y0 + side) * k - 1)
        if scene.caption_.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.caption_.shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle pointing up
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX))


def batch(seed: int | Sequence[int], n: int, captions: Sequence[Caption] = TRAIN_CAPTIONS,
          count_weights: Sequence[float] | None = None) -> tuple[list[Scene], np.ndarray]:
    """n scenes and their images (n×SIZE×SIZE×3 uint8) from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    probs = None if count_weights is None else caption_probs(captions, count_weights)
    scenes = [sample_scene(rng, captions, probs) for _ in range(n)]
    return scenes, np.stack([render(s) for s in scenes])


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (as a command would name it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def to_tensor(images: np.ndarray):
    """uint8 N×H×W×3 → float N×3×H×W in [-1, 1] (what the VAE takes)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
