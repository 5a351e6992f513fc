"""Human-preference rewards on CLIP ViT-H/14: PickScore and HPSv2 / HPSv2.1.

    reward = build_reward({"name": "pickscore"})                       # yuvalkirstain/PickScore_v1
    reward = build_reward({"name": "hpsv2", "checkpoint": "/models/HPS_v2.1_compressed.pt"})
    scores = reward(images, prompts)    # images: B×3×H×W in [0, 1], one prompt per image → B scores

Both score each image against its own prompt with the cosine of CLIP's projected image and text
embeddings (`clip_similarity`); the images are preprocessed on tensors, so the scores are
differentiable with respect to the pixels. The CLIP weights are frozen.

Preprocessing follows each model's reference pipeline:
* PickScore: transformers' CLIPProcessor (`clip_preprocess`: shorter side → 224, bicubic,
  antialiased, centre crop); prompts go to the tokenizer as given (the reference's fast CLIP
  tokenizer normalises NFC + whitespace + lower case itself; no ftfy/html unescaping).
* HPSv2: its open_clip `image_transform(resize_longest_max=True)` = `ResizeMaxSize(224)`:
  longest side → 224 (bicubic on tensors, antialiased as torchvision ≥ 0.17 does), zero-pad
  to 224×224 (left/top = pad // 2), then CLIP mean/std (`hpsv2_preprocess`); prompts are cleaned
  like open_clip's tokenizer (`clean_prompt`: ftfy.fix_text, html.unescape twice, whitespace).
* `resize: official` (both HPSv2 and aesthetic, not PickScore, which the official AlignProp code
  does not use) switches to the official AlignProp training code's input: torchvision
  `Resize(224)` (bilinear, no antialias under its torchvision 0.15.2) + centre crop.

* PickScore (https://huggingface.co/yuvalkirstain/PickScore_v1) is a transformers CLIPModel; its
  score is `logit_scale.exp() * cos` (≈ 100 × cos, typically ~18–23), as in the PickScore paper's code.
* HPSv2 (https://huggingface.co/xswu/HPSv2) ships an open_clip ViT-H-14 state dict
  (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`). It is loaded into transformers' CLIPModel
  through `open_clip_to_transformers`, no open_clip needed. The HPS score is the plain cosine
  (typically ~0.2–0.3); the "×100" often quoted is display only and is not applied here.

`dtype` (both; `auto` default: the worker's compute dtype, float32 outside a worker; or float32,
bfloat16, float16) is the CLIP weights' dtype; preprocessing, the cosine and the scores stay float32.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import (CLIP_MEAN, CLIP_STD, DTYPE_CHOICES, RESIZE_MODES, Reward, clip_preprocess,
                                    official_preprocess, read_state_dict)

CLIP_H14_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # hpsv2.utils.hps_version_map
HPS_VERSION = "v2.1"
HPS_FILE = HPS_FILES[HPS_VERSION]
HPS_URL = "https://huggingface.co/xswu/HPSv2"


def clean_prompt(text: str) -> str:
    """open_clip's tokenizer cleaning (`whitespace_clean(basic_clean(text))`, tokenizer.py):
    `ftfy.fix_text`, `html.unescape` twice, strip, then runs of whitespace → one space.
    (Lower-casing is left to the CLIP tokenizer, which does it too.)"""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip()


def hpsv2_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """HPSv2's eval transform on tensors (B×3×H×W in [0, 1] → B×3×size×size, differentiable).

    open_clip `ResizeMaxSize(size, fill=0)` as vendored by HPSv2 (hpsv2/src/open_clip/transform.py):
    scale = size / max(H, W), new (H, W) = round(dim · scale), torchvision `F.resize` bicubic on the
    tensor (antialias=True, torchvision ≥ 0.17's default), zero padding [left, top, right, bottom]
    = [pad_w // 2, pad_h // 2, pad_w − pad_w // 2, pad_h − pad_h // 2]; then CLIP normalisation
    (so the padding becomes −mean/std). The reference skips resize *and* padding when the longest
    side already equals `size` (leaving a non-square input the model cannot take); here it pads.
    """
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        h, w = round(h * scale), round(w * scale)
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - h, size - w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Shared: tokenizer and CLIP image·text similarity
# ---------------------------------------------------------------------------------------------

def load_clip_tokenizer(name: str, local_files_only: bool):
    """A CLIP BPE tokenizer from a hub id or directory (a tokenizer or processor checkpoint)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(name, local_files_only=local_files_only)


def clip_similarity(model: nn.Module, tokenizer, images: torch.Tensor, prompts: Sequence[str],
                    preprocess: Callable[[torch.Tensor, int], torch.Tensor] = clip_preprocess,
                    clean: Optional[Callable[[str], str]] = None) -> torch.Tensor:
    """cos(image_embeds[i], text_embeds[i]) for each image and its own prompt, float32, shape (B,).

    `model` is a transformers CLIPModel. Images go through `preprocess(images, image_size)` on
    tensors at the model's vision `image_size` (float32), then are cast to the model's dtype; prompts
    through `clean` (if given), then are padded to the text context (77) and truncated.
    """
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; give one prompt per image")
    if clean is not None:
        prompts = [clean(p) for p in prompts]
    config = model.config
    pixels = preprocess(images, config.vision_config.image_size).to(model.dtype)
    tokens = tokenizer(prompts, padding="max_length", truncation=True,
                       max_length=config.text_config.max_position_embeddings, return_tensors="pt")
    device = pixels.device
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text = model.text_projection(model.text_model(input_ids=tokens["input_ids"].to(device),
                                                  attention_mask=tokens["attention_mask"].to(device)).pooler_output)
    image = image.float() / image.float().norm(dim=-1, keepdim=True)
    text = text.float() / text.float().norm(dim=-1, keepdim=True)
    return (image * text).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# PickScore
# ---------------------------------------------------------------------------------------------

class PickScore(Reward):
    """PickScore v1: `logit_scale.exp() * cos(image, prompt)`; with `scale=False`, the raw cosine.

    Options: `model` (CLIPModel hub id or directory), `processor` (where the tokenizer lives: hub id
    or directory of the CLIP-H processor/tokenizer), `local_files_only`, `scale`, `dtype` (module doc).
    The scale is read once in float32 at load: a bf16 logit_scale would shift it by ~1 %.
    """

    name = "pickscore"
    needs = f"CLIPModel {PICKSCORE_MODEL} + tokenizer {CLIP_H14_TOKENIZER} (hub ids or local directories)"
    choices = {"dtype": DTYPE_CHOICES}

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = CLIP_H14_TOKENIZER,
                 local_files_only: bool = False, scale: bool = True, dtype: str = "auto"):
        super().__init__()
        from transformers import CLIPModel

        self.tokenizer = load_clip_tokenizer(processor, local_files_only)
        self.clip = CLIPModel.from_pretrained(model, local_files_only=local_files_only)
        self.scale = scale
        self.logit_scale = self.clip.logit_scale.detach().float().exp().item()  # before `cast`: exact
        self.freeze().cast(dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = clip_similarity(self.clip, self.tokenizer, images, prompts)
        return self.logit_scale * cos if self.scale else cos


# ---------------------------------------------------------------------------------------------
# HPSv2: open_clip ViT-H-14 state dict → transformers CLIPModel
# ---------------------------------------------------------------------------------------------

def vit_h14_config():
    """transformers CLIPConfig of open_clip's ViT-H-14 (GELU, LayerNorm eps 1e-5, embed dim 1024)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                         layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         projection_dim=1024),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
                           projection_dim=1024),
        projection_dim=1024,
    )


# open_clip key → transformers key, copied as is.
_OPEN_CLIP_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",  # both store log(1/temperature)
}
# open_clip projections are `x @ proj` (width × embed); nn.Linear weights are (embed × width).
_OPEN_CLIP_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
# Inside a residual block: `{prefix}transformer.resblocks.{i}.<key>` → `{tower}.encoder.layers.{i}.<key>`.
_OPEN_CLIP_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# nn.MultiheadAttention's packed projection: rows [q; k; v].
_OPEN_CLIP_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP (ViT) state dict to transformers CLIPModel keys.

    Splits the packed attention `in_proj` into q/k/v and transposes the two projections; tensors
    are otherwise shared, not copied. A DDP `module.` prefix is dropped. Any key it does not know
    raises ValueError (listing them), so nothing is silently left out.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key in _OPEN_CLIP_DIRECT:
            out[_OPEN_CLIP_DIRECT[key]] = value
        elif key in _OPEN_CLIP_TRANSPOSED:
            out[_OPEN_CLIP_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _BLOCK_KEY.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            layer = f"{tower}.encoder.layers.{match.group(2)}"
            rest = match.group(3)
            if rest in _OPEN_CLIP_BLOCK:
                out[f"{layer}.{_OPEN_CLIP_BLOCK[rest]}"] = value
            elif rest in _OPEN_CLIP_IN_PROJ:
                suffix = _OPEN_CLIP_IN_PROJ[rest]
                q, k, v = value.chunk(3, dim=0)
                out[f"{layer}.self_attn.q_proj.{suffix}"] = q
                out[f"{layer}.self_attn.k_proj.{suffix}"] = k
                out[f"{layer}.self_attn.v_proj.{suffix}"] = v
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"open_clip → transformers: {len(unknown)} unmapped key(s), e.g. {unknown[:5]}; "
                         "expected an open_clip ViT CLIP state dict (like HPSv2's ViT-H-14)")
    return out


def load_open_clip_checkpoint(path: str, config) -> nn.Module:
    """A transformers CLIPModel (float32) holding the open_clip weights in `path`; strict.

    The model is built with parameters on the meta device and the mapped tensors assigned in,
    so there is no random initialisation and no second copy of the weights.
    """
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    mapped = open_clip_to_transformers(read_state_dict(path))
    with init_empty_weights(include_buffers=False):
        model = CLIPModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if k in mapped and mapped[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(f"hpsv2: checkpoint {path} does not fit the CLIP config: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(wrong)} shape mismatches (e.g. {wrong[:3]}); check the `config` option")
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.float()


class HPSv2(Reward):
    """Human Preference Score v2 / v2.1: cos(image, prompt) under the HPS-tuned CLIP ViT-H/14.

    Options: `checkpoint` (local path to the version's file — HPS_v2.1_compressed.pt for v2.1,
    HPS_v2_compressed.pt for v2.0 — or a .safetensors of the same state dict), `version` (`v2.1`
    default, or `v2.0`: same architecture, different weights; a checkpoint named after the other
    version is refused), `tokenizer` (CLIP BPE tokenizer: hub id or directory), `config`
    (CLIPConfig hub id or directory; default: ViT-H-14 built in code, nothing fetched),
    `local_files_only` (for the tokenizer and config), `resize` (`reference`: HPSv2's own
    longest-side resize + zero pad, `hpsv2_preprocess`; `official`: the official AlignProp code's
    bilinear shorter-side `Resize(224)` + centre crop), `dtype` (module doc).
    """

    name = "hpsv2"
    needs = (f"{HPS_FILES['v2.1']} (version v2.1, default) or {HPS_FILES['v2.0']} (version v2.0) from {HPS_URL} "
             f"+ tokenizer {CLIP_H14_TOKENIZER}")
    choices = {"version": tuple(HPS_FILES), "resize": RESIZE_MODES, "dtype": DTYPE_CHOICES}

    @classmethod
    def spec_error(cls, spec):
        return _version_mismatch(spec.get("checkpoint"), spec.get("version", HPS_VERSION))

    def __init__(self, checkpoint: Optional[str] = None, version: str = HPS_VERSION,
                 tokenizer: str = CLIP_H14_TOKENIZER,
                 config: Optional[str] = None, local_files_only: bool = False, resize: str = "reference",
                 dtype: str = "auto"):
        super().__init__()
        if version not in HPS_FILES:
            raise ValueError(f"hpsv2: version {version!r} unknown; accepted: {', '.join(HPS_FILES)}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"hpsv2: resize {resize!r} unknown; accepted: {', '.join(RESIZE_MODES)}")
        self.version, self.resize = version, resize
        self.needs = f"{HPS_FILES[version]} from {HPS_URL} + tokenizer {tokenizer}"
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"hpsv2: checkpoint not found (checkpoint={checkpoint!r}); expected {HPS_FILES[version]} (version "
                f"{version}) "
                f"from {HPS_URL} — download it and set the reward option checkpoint to its local path")
        problem = _version_mismatch(checkpoint, version)
        if problem is not None:
            raise ValueError(f"hpsv2: {problem[1]}")
        if config is None:
            clip_config = vit_h14_config()
        else:
            from transformers import CLIPConfig

            clip_config = CLIPConfig.from_pretrained(config, local_files_only=local_files_only)
        self.tokenizer = load_clip_tokenizer(tokenizer, local_files_only)
        self.clip = load_open_clip_checkpoint(checkpoint, clip_config)
        self.freeze().cast(dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        preprocess = hpsv2_preprocess if self.resize == "reference" else official_preprocess
        return clip_similarity(self.clip, self.tokenizer, images, prompts, preprocess=preprocess, clean=clean_prompt)


def _version_mismatch(checkpoint, version) -> Optional[tuple[str, str]]:
    """('version', message) when the checkpoint file is the other HPS version's released file."""
    if not isinstance(checkpoint, str) or version not in HPS_FILES:
        return None
    for other, file in HPS_FILES.items():
        if other != version and Path(checkpoint).name == file:
            return ("version", f"got {version!r} but checkpoint {checkpoint!r} is the {other} file; "
                               f"set version: {other} or point checkpoint at {HPS_FILES[version]}")
    return None
