"""Human-preference rewards on CLIP ViT-H/14: PickScore and HPSv2 / HPSv2.1.

    reward = build_reward({"name": "pickscore"})                       # yuvalkirstain/PickScore_v1
    reward = build_reward({"name": "hpsv2", "checkpoint": "/models/HPS_v2.1_compressed.pt"})
    scores = reward(images, prompts)    # images: B×3×H×W in [0, 1], one prompt per image → B scores

Both score each image against its own prompt with the cosine of CLIP's projected image and text
embeddings (`clip_similarity`); the images go through `clip_preprocess` on tensors, so the scores
are differentiable with respect to the pixels. The CLIP weights are frozen.

* PickScore (https://huggingface.co/yuvalkirstain/PickScore_v1) is a transformers CLIPModel; its
  score is `logit_scale.exp() * cos` (≈ 100 × cos, typically ~18–23), as in the PickScore paper's code.
* HPSv2 (https://huggingface.co/xswu/HPSv2) ships an open_clip ViT-H-14 state dict
  (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`). It is loaded into transformers' CLIPModel
  through `open_clip_to_transformers`, no open_clip needed. The HPS score is the plain cosine
  (typically ~0.2–0.3); the "×100" often quoted is display only and is not applied here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from alignprop.rewards.base import Reward, clip_preprocess, read_state_dict

CLIP_H14_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_URL = "https://huggingface.co/xswu/HPSv2"


# ---------------------------------------------------------------------------------------------
# Shared: tokenizer and CLIP image·text similarity
# ---------------------------------------------------------------------------------------------

def load_clip_tokenizer(name: str, local_files_only: bool):
    """A CLIP BPE tokenizer from a hub id or directory (a tokenizer or processor checkpoint)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(name, local_files_only=local_files_only)


def clip_similarity(model: nn.Module, tokenizer, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """cos(image_embeds[i], text_embeds[i]) for each image and its own prompt, float32, shape (B,).

    `model` is a transformers CLIPModel. Images are resized/cropped/normalised on tensors at the
    model's vision `image_size`; prompts are padded to the text context (77) and truncated.
    """
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; give one prompt per image")
    config = model.config
    pixels = clip_preprocess(images, config.vision_config.image_size).to(model.dtype)
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
    or directory of the CLIP-H processor/tokenizer), `local_files_only`, `scale`.
    """

    name = "pickscore"
    needs = f"CLIPModel {PICKSCORE_MODEL} + tokenizer {CLIP_H14_TOKENIZER} (hub ids or local directories)"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = CLIP_H14_TOKENIZER,
                 local_files_only: bool = False, scale: bool = True):
        super().__init__()
        from transformers import CLIPModel

        self.tokenizer = load_clip_tokenizer(processor, local_files_only)
        self.clip = CLIPModel.from_pretrained(model, local_files_only=local_files_only)
        self.scale = scale
        self.freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = clip_similarity(self.clip, self.tokenizer, images, prompts)
        return self.clip.logit_scale.exp().float() * cos if self.scale else cos


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

    Options: `checkpoint` (local path to HPS_v2.1_compressed.pt or HPS_v2_compressed.pt, or a
    .safetensors of the same state dict), `tokenizer` (CLIP BPE tokenizer: hub id or directory),
    `config` (CLIPConfig hub id or directory; default: ViT-H-14 built in code, nothing fetched),
    `local_files_only` (for the tokenizer and config).
    """

    name = "hpsv2"
    needs = f"{HPS_FILE} (or HPS_v2_compressed.pt) from {HPS_URL} + tokenizer {CLIP_H14_TOKENIZER}"

    def __init__(self, checkpoint: Optional[str] = None, tokenizer: str = CLIP_H14_TOKENIZER,
                 config: Optional[str] = None, local_files_only: bool = False):
        super().__init__()
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"hpsv2: checkpoint not found (checkpoint={checkpoint!r}); expected {HPS_FILE} (or HPS_v2_compressed.pt) "
                f"from {HPS_URL} — download it and set the reward option checkpoint to its local path")
        if config is None:
            clip_config = vit_h14_config()
        else:
            from transformers import CLIPConfig

            clip_config = CLIPConfig.from_pretrained(config, local_files_only=local_files_only)
        self.tokenizer = load_clip_tokenizer(tokenizer, local_files_only)
        self.clip = load_open_clip_checkpoint(checkpoint, clip_config)
        self.freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return clip_similarity(self.clip, self.tokenizer, images, prompts)
