"""Object-count reward: an open-vocabulary detector (OWL-ViT / OWLv2) counts the prompt's object.

    reward = build_reward({"name": "object_count"})          # target and object parsed per prompt
    scores = reward(images, ["three apples", "a photo of two dogs"])   # −|soft count − target|

Each image gets one text query, "a photo of a(n) <object>", where <object> comes from the `object`
option or from its prompt ("3 red apples" → "red apple"); the target comes from the `target` option
or from the prompt's number (one…twelve or digits). The detector scores every predicted box for the
query; the soft count is Σ_box g(sigmoid(logit)), with g a sigmoid step at `threshold` of sharpness
`temperature`, rescaled so that g(0) = 0 and g(1) = 1 (hundreds of background boxes add nothing).
Duplicate boxes on one object are dropped before summing when `nms_iou` is set (a "fast NMS" mask,
computed without grad). The reward is −|soft count − target|, differentiable w.r.t. the pixels.

`model` is a hub id or local directory holding an OwlViTForObjectDetection or
Owlv2ForObjectDetection checkpoint (picked by its config's model_type) and its tokenizer.
`dtype` (`auto` default: the worker's compute dtype, float32 outside a worker; or float32, bfloat16,
float16) is the detector's dtype; preprocessing, box probabilities and scores stay float32.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import CLIP_MEAN, CLIP_STD, DTYPE_CHOICES, Reward

NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
# Words that end the object phrase after the number: "three apples on a table" → "apples".
STOP_WORDS = {"on", "in", "into", "with", "at", "under", "over", "near", "next", "beside", "behind", "by",
              "and", "or", "of", "from", "for", "to", "inside", "outside", "above", "below", "against",
              "that", "which", "who", "are", "is", "sit", "sits", "stand", "stands", "lying"}
IRREGULAR = {"people": "person", "children": "child", "men": "man", "women": "woman", "mice": "mouse",
             "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "wolves": "wolf",
             "leaves": "leaf", "loaves": "loaf", "shelves": "shelf", "calves": "calf", "halves": "half",
             "wives": "wife", "lives": "life", "oxen": "ox", "dice": "die", "sheep": "sheep", "fish": "fish",
             "deer": "deer", "series": "series", "species": "species", "buses": "bus",
             "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero", "mangoes": "mango"}
MAX_PHRASE_WORDS = 4
_NUMBER = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[^\sA-Za-z]")


def singularise(word: str) -> str:
    """Naive English singular of one word: apples → apple, cherries → cherry, boxes → box."""
    w = word.lower()
    if w in IRREGULAR:
        return IRREGULAR[w]
    if len(w) > 3 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return w[:-2]
    if len(w) > 2 and w.endswith("s") and not w.endswith(("ss", "us")):
        return w[:-1]
    return w


def parse_count_prompt(prompt: str) -> tuple[Optional[int], Optional[str]]:
    """(count, singular object phrase) from "three apples", "a photo of 3 red apples on a table", ….

    The first number (one…twelve, zero, or digits) followed by a word gives the count; the words after
    it, up to a plural noun (included), a preposition/conjunction, punctuation, a word in -ing after
    the first, or four words, give the object, its last word singularised unless the count is one.
    (None, None) when the prompt has no such number.
    """
    for match in _NUMBER.finditer(prompt):
        token = match.group(1).lower()
        count = int(token) if token.isdigit() else NUMBER_WORDS[token]
        words = []
        for word in _WORD.findall(prompt[match.end():]):
            lower = word.lower()
            if not lower[0].isalpha() or lower in STOP_WORDS or (words and lower.endswith("ing")):
                break
            words.append(lower)
            if len(words) == MAX_PHRASE_WORDS or (count != 1 and singularise(lower) != lower):
                break  # a plural noun ends the phrase: "two dogs parked …" → "dogs"
        if words:
            head = words[-1] if count == 1 else singularise(words[-1])
            return count, " ".join(words[:-1] + [head])
    return None, None


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of N×4 (cx, cy, w, h) boxes → N×N."""
    xy0, xy1 = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
    area = boxes[:, 2].clamp(min=0) * boxes[:, 3].clamp(min=0)
    inter = (torch.minimum(xy1[:, None], xy1[None]) - torch.maximum(xy0[:, None], xy0[None])).clamp(min=0).prod(-1)
    return inter / (area[:, None] + area[None] - inter).clamp(min=1e-9)


@torch.no_grad()
def fast_nms_keep(scores: torch.Tensor, boxes: torch.Tensor, iou: float) -> torch.Tensor:
    """Boxes that no higher-scoring box overlaps by more than `iou` ("fast NMS", YOLACT): bool N."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if scores.numel() > 1:
        order = scores.argsort(descending=True)
        overlaps = box_iou(boxes[order].float()).triu(diagonal=1)  # [i, j]: i scores higher than j
        keep[order] = overlaps.amax(dim=0) <= iou
    return keep


def soft_count(probs: torch.Tensor, boxes: Optional[torch.Tensor], threshold: float, temperature: float,
               nms_iou: Optional[float] = None) -> torch.Tensor:
    """Σ over boxes of a smooth step of each box's probability at `threshold`; probs B×N, boxes B×N×4.

    step(p) = (σ((p − t)·T) − σ(−t·T)) / (σ((1 − t)·T) − σ(−t·T)): 0 at p = 0, 1 at p = 1.
    """
    lo, hi = (float(torch.tensor(v * temperature, dtype=torch.float64).sigmoid()) for v in (-threshold, 1 - threshold))
    step = (torch.sigmoid((probs.float() - threshold) * temperature) - lo) / (hi - lo)
    if nms_iou is not None and boxes is not None:
        # Only boxes that count (step > 1e-3) take part: the rest add ~nothing kept or not, and
        # OWLv2's 3600 boxes would make the IoU matrix large.
        keep = torch.ones_like(step, dtype=torch.bool)
        for i in range(step.shape[0]):
            live = (step[i].detach() > 1e-3).nonzero().squeeze(-1)
            keep[i, live] = fast_nms_keep(probs[i, live].detach(), boxes[i, live].detach(), nms_iou)
        step = step * keep
    return step.sum(dim=-1)


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur (per axis σ; kernel 2⌈3σ⌉ + 1, reflect padding), as torchvision's."""
    for axis, s in zip((-2, -1), sigma):
        if s <= 0:
            continue
        radius = int(math.ceil(3 * s))
        offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (offsets / s) ** 2)
        kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1)
        if axis == -2:
            x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[..., None], groups=x.shape[1])
        else:
            x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, :, None], groups=x.shape[1])
    return x


def detection_preprocess(images: torch.Tensor, size: int, owlv2: bool) -> torch.Tensor:
    """The detector's image processor on tensors, so grads flow; B×3×H×W in [0, 1] → B×3×size×size.

    OWL-ViT (OwlViTImageProcessor): resize straight to size×size (bicubic, anti-aliased; no crop).
    OWLv2 (Owlv2ImageProcessor): pad bottom/right with 0 to a square, Gaussian blur with
    σ = (factor − 1)/2 when shrinking, then bilinear resize without anti-aliasing. Both: CLIP mean/std.
    """
    x = images.float()
    if owlv2:
        h, w = x.shape[-2:]
        side = max(h, w)
        x = F.pad(x, (0, side - w, 0, side - h), value=0.0)
        x = gaussian_blur(x, ((side / size - 1) / 2,) * 2)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    else:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


def load_detector(model: str, local_files_only: bool):
    """(detector, tokenizer, is_owlv2) for an OWL-ViT or OWLv2 checkpoint, chosen by config.model_type."""
    from transformers import AutoConfig, AutoTokenizer, Owlv2ForObjectDetection, OwlViTForObjectDetection

    config = AutoConfig.from_pretrained(model, local_files_only=local_files_only)
    classes = {"owlvit": OwlViTForObjectDetection, "owlv2": Owlv2ForObjectDetection}
    if config.model_type not in classes:
        raise ValueError(f"object_count: {model!r} is a {config.model_type!r} checkpoint; "
                         f"expected an OWL-ViT or OWLv2 detector (model_type owlvit or owlv2)")
    detector = classes[config.model_type].from_pretrained(model, config=config, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
    return detector, tokenizer, config.model_type == "owlv2"


class ObjectCount(Reward):
    """−|soft count of the prompt's object − target count|, from an open-vocabulary detector."""

    name = "object_count"
    needs = "OWL-ViT (google/owlvit-base-patch32) or OWLv2 (google/owlv2-base-patch16-ensemble) detector"
    choices = {"dtype": DTYPE_CHOICES}

    def __init__(self, model: str = "google/owlvit-base-patch32", local_files_only: bool = False,
                 target: Optional[int] = None, object: Optional[str] = None, temperature: float = 100.0,
                 threshold: float = 0.1, nms_iou: Optional[float] = 0.3, dtype: str = "auto"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"object_count: temperature must be > 0, got {temperature!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"object_count: threshold must be in (0, 1), got {threshold!r}")
        self.detector, self.tokenizer, self.owlv2 = load_detector(model, local_files_only)
        self.detector.requires_grad_(False).eval()
        self.cast(dtype)
        vision = self.detector.config.vision_config
        self.image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        self.max_length = self.detector.config.text_config.max_position_embeddings
        self.target, self.object = target, object
        self.temperature, self.threshold, self.nms_iou = float(temperature), float(threshold), nms_iou

    def query(self, prompt: str) -> tuple[int, str]:
        """(target count, text query) for one prompt; options take precedence over the prompt."""
        count, thing = parse_count_prompt(prompt)
        target = self.target if self.target is not None else count
        thing = self.object if self.object is not None else thing
        if target is None or thing is None:
            missing = " and ".join(m for m, v in (("a count", target), ("an object", thing)) if v is None)
            raise ValueError(f"object_count: prompt {prompt!r} gives no {missing} to count; set the reward "
                             f"options `target` (and `object`) or phrase prompts like \"three apples\"")
        return target, f"a photo of {'an' if thing[:1].lower() in 'aeiou' else 'a'} {thing}"

    def queries(self, prompts: Sequence[str]) -> tuple[list[int], list[str]]:
        pairs = [self.query(p) for p in prompts]
        return [t for t, _ in pairs], [q for _, q in pairs]

    def detect(self, images: torch.Tensor, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-box probability of each image's query, B×N; boxes B×N×4 cx, cy, w, h)."""
        tokens = self.tokenizer(list(queries), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(images.device)
        pixels = self._to_model(detection_preprocess(images, self.image_size, self.owlv2))
        out = self.detector(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        return out.logits[..., 0].float().sigmoid(), out.pred_boxes.float()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"object_count: {images.shape[0]} images but {len(prompts)} prompts")
        targets, queries = self.queries(prompts)
        probs, boxes = self.detect(images, queries)
        counts = soft_count(probs, boxes, self.threshold, self.temperature, self.nms_iou)
        return -(counts - torch.tensor(targets, dtype=counts.dtype, device=counts.device)).abs()
