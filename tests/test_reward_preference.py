"""PickScore and HPSv2 on real transformers CLIP models with random weights (CPU, offline).

HPSv2 checkpoints are open_clip state dicts: the tests write tiny (and one full-size ViT-H-14)
open_clip-format files with an inverse key mapping written here independently of the one in
`alignprop.rewards.preference`, and check that loading reproduces every tensor exactly.
"""

import gc
import math
import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from alignprop.platform.models import build_tiny_tokenizer
from alignprop.platform.config import ConfigError
from alignprop.rewards import validate_reward_specs
from alignprop.rewards.base import CLIP_MEAN, CLIP_STD, clip_preprocess
from alignprop.rewards.preference import (HPS_FILE, HPS_FILES, HPSv2, PickScore, clean_prompt, hpsv2_preprocess,
                                          vit_h14_config)

PROMPTS = ["a photo of a cat", "a red car", "an oil painting of a castle"]


def tiny_config(tokenizer) -> CLIPConfig:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **common, **ids),
                      vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=16)


def images(batch=3, h=40, w=48, grad=False):
    torch.manual_seed(2)
    return torch.rand(batch, 3, h, w).requires_grad_(grad)


# --- the inverse mapping (transformers → open_clip), written independently --------------------

def transformers_to_open_clip(sd, vision_layers, text_layers):
    """open_clip ViT CLIP keys from a transformers CLIPModel state dict; q/k/v packed into in_proj."""
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for ours, theirs, layers in (("visual.transformer", "vision_model.encoder", vision_layers),
                                 ("transformer", "text_model.encoder", text_layers)):
        for i in range(layers):
            a, b = f"{ours}.resblocks.{i}", f"{theirs}.layers.{i}"
            for kind in ("weight", "bias"):
                out[f"{a}.attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{b}.self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
                out[f"{a}.attn.out_proj.{kind}"] = sd[f"{b}.self_attn.out_proj.{kind}"]
                out[f"{a}.ln_1.{kind}"] = sd[f"{b}.layer_norm1.{kind}"]
                out[f"{a}.ln_2.{kind}"] = sd[f"{b}.layer_norm2.{kind}"]
                out[f"{a}.mlp.c_fc.{kind}"] = sd[f"{b}.mlp.fc1.{kind}"]
                out[f"{a}.mlp.c_proj.{kind}"] = sd[f"{b}.mlp.fc2.{kind}"]
    return out


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer dir, CLIP config, a saved tiny CLIPModel (PickScore) and its open_clip file (HPSv2)."""
    root = tmp_path_factory.mktemp("preference")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    config = tiny_config(tokenizer)
    config.save_pretrained(root / "config")
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    model.save_pretrained(root / "clip")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    open_clip = transformers_to_open_clip(original, 2, 2)
    torch.save({"state_dict": open_clip, "epoch": 1}, root / HPS_FILE)
    return dict(root=root, tokenizer=str(root / "tokenizer"), config=str(root / "config"), clip=str(root / "clip"),
                checkpoint=str(root / HPS_FILE), original=original, open_clip=open_clip, model=model)


def pickscore(tiny, **kw):
    return PickScore(model=tiny["clip"], processor=tiny["tokenizer"], local_files_only=True, **kw)


def hpsv2(tiny, **kw):
    return HPSv2(**{"checkpoint": tiny["checkpoint"], "tokenizer": tiny["tokenizer"], "config": tiny["config"],
                    "local_files_only": True, **kw})


def reference_logits(tiny, x, prompts, pixels=None):
    """transformers' own CLIPModel forward on the same pixels and tokens: logits_per_image diagonal."""
    from transformers import CLIPTokenizer

    tokens = CLIPTokenizer.from_pretrained(tiny["tokenizer"])(prompts, padding="max_length", max_length=77,
                                                              truncation=True, return_tensors="pt")
    out = tiny["model"](input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=clip_preprocess(x, 32) if pixels is None else pixels)
    return out.logits_per_image.diagonal()


# --- the references' few essential lines, written here ----------------------------------------

def normalize(x):
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def reference_resize_max_size(img, max_size):
    """HPSv2's vendored open_clip transform.py `ResizeMaxSize.forward` on a 3×H×W tensor (its eval
    transform applies it after ToTensor), torchvision's tensor `F.resize` being `interpolate(...,
    align_corners=False, antialias=True)` for bicubic (torchvision ≥ 0.17), `F.pad` with fill 0."""
    height, width = img.shape[1:]
    scale = max_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = torch.nn.functional.interpolate(img[None], size=new_size, mode="bicubic", align_corners=False,
                                              antialias=True)[0]
        pad_h = max_size - new_size[0]
        pad_w = max_size - new_size[1]
        left, top, right, bottom = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
        img = torch.nn.functional.pad(img, (left, right, top, bottom), value=0)
    return img


def reference_hps_transform(x, size):
    return torch.stack([normalize(reference_resize_max_size(img, size)) for img in x])


def reference_clean(text):
    """open_clip tokenizer.py: whitespace_clean(basic_clean(text))."""
    import html

    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = " ".join(text.split())
    return text.strip()


def reference_official(x, size):
    """Official AlignProp (main.py): torchvision Resize(size) on tensors under torchvision 0.15.2
    (bilinear, antialias None → False for tensors), shorter side; + CenterCrop(size) offsets."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    x = torch.nn.functional.interpolate(x, size=[new_h, new_w], mode="bilinear", align_corners=False,
                                        antialias=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return normalize(x[..., top:top + size, left:left + size])


# --- behaviour shared by both rewards ---------------------------------------------------------

@pytest.fixture(params=["pickscore", "hpsv2"])
def reward(request, tiny):
    return pickscore(tiny) if request.param == "pickscore" else hpsv2(tiny)


def test_differentiable_wrt_pixels_only(reward):
    assert not reward.training and not reward.clip.training
    x = images(grad=True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_batch_equals_singles_and_prompts_matter(reward):
    x = images()
    with torch.no_grad():
        batch = reward(x, PROMPTS)
        single = torch.cat([reward(x[i:i + 1], [PROMPTS[i]]) for i in range(3)])
        other = reward(x, ["a bowl of soup"] * 3)
        long = reward(x[:1], ["a very long prompt " * 20])  # truncated to 77 tokens, still one score
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert (batch - other).abs().min() > 1e-6
    assert long.shape == (1,) and torch.isfinite(long).all()


def test_one_prompt_per_image(reward):
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(images(), PROMPTS[:2])


# --- PickScore --------------------------------------------------------------------------------

def test_pickscore_loads_the_saved_model_and_matches_clip_logits(tiny):
    reward = pickscore(tiny)
    for key, value in reward.clip.state_dict().items():
        assert torch.equal(value, tiny["original"][key]), key
    x = images()
    with torch.no_grad():
        scores = reward(x, PROMPTS)
        torch.testing.assert_close(scores, reference_logits(tiny, x, PROMPTS), atol=1e-5, rtol=1e-5)
        cos = pickscore(tiny, scale=False)(x, PROMPTS)
    torch.testing.assert_close(scores, 50.0 * cos, atol=1e-5, rtol=1e-5)
    assert cos.abs().max() <= 1.0


# --- HPSv2 ------------------------------------------------------------------------------------

def test_hpsv2_round_trip_is_exact(tiny, tmp_path):
    loaded = hpsv2(tiny).clip.state_dict()
    assert set(loaded) == set(tiny["original"])
    for key, value in tiny["original"].items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value), key
    # The same state dict unwrapped, behind a DDP "module." prefix, or as safetensors loads identically.
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in tiny["open_clip"].items()}, bare)
    safe = tmp_path / "hps.safetensors"
    save_file({k: v.contiguous() for k, v in tiny["open_clip"].items()}, str(safe))
    for path in (bare, safe):
        again = hpsv2(tiny, checkpoint=str(path)).clip.state_dict()
        assert all(torch.equal(again[k], v) for k, v in tiny["original"].items())


def test_hpsv2_fp16_checkpoint_loads_as_float32(tiny, tmp_path):
    path = tmp_path / "half.pt"
    torch.save({"state_dict": {k: v.half() for k, v in tiny["open_clip"].items()}}, path)
    loaded = hpsv2(tiny, checkpoint=str(path)).clip.state_dict()
    assert all(v.dtype == torch.float32 for k, v in loaded.items() if v.is_floating_point())
    torch.testing.assert_close(loaded["visual_projection.weight"], tiny["original"]["visual_projection.weight"],
                               atol=1e-3, rtol=1e-3)


def test_hpsv2_score_is_the_plain_cosine(tiny):
    x = images()
    with torch.no_grad():
        scores = hpsv2(tiny)(x, PROMPTS)
        reference = reference_logits(tiny, x, PROMPTS, pixels=reference_hps_transform(x, 32))
        torch.testing.assert_close(scores, reference / 50.0, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 300, 512), (1, 3, 512, 300), (1, 3, 333, 517), (2, 3, 100, 60),
                                   (1, 3, 512, 512)])
def test_hpsv2_preprocess_matches_resize_max_size(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = hpsv2_preprocess(x)
    assert ours.shape == (shape[0], 3, 224, 224)
    torch.testing.assert_close(ours, reference_hps_transform(x, 224), atol=1e-5, rtol=0)
    if shape[2] != shape[3]:  # the padding is there, zero before normalisation
        padded = ours * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        edge = padded[..., 0, :] if shape[2] < shape[3] else padded[..., :, 0]
        assert edge.abs().max() < 1e-6
        # ... and it is not CLIP's crop
        assert (ours - clip_preprocess(x, 224)).abs().max() > 0.1


def test_hpsv2_preprocess_pads_when_the_longest_side_already_fits():
    x = torch.rand(1, 3, 224, 100, generator=torch.Generator().manual_seed(0))
    ours = hpsv2_preprocess(x)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours[..., 62:162], normalize(x[0])[None])  # pad 124 → 62 | 62


def test_hpsv2_non_square_score_matches_the_reference_pipeline(tiny):
    x = images(batch=2, h=40, w=72, grad=True)
    prompts = ["  \u201ca cat\u201d &amp;amp; a   dog ", "caf\u00c3\u00a9 &lt;b&gt;on the moon"]
    scores = hpsv2(tiny)(x, prompts)
    scores.sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        cleaned = [reference_clean(p) for p in prompts]
        reference = reference_logits(tiny, x.detach(), cleaned, pixels=reference_hps_transform(x.detach(), 32)) / 50.0
        uncleaned = hpsv2(tiny)(x.detach(), cleaned)  # the same as cleaning first
        cropped = reference_logits(tiny, x.detach(), cleaned) / 50.0  # CLIP's resize + crop instead
    torch.testing.assert_close(scores.detach(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncleaned, reference, atol=1e-5, rtol=1e-5)
    assert (scores.detach() - cropped).abs().max() > 1e-4


def test_hpsv2_official_resize_matches_the_alignprop_code(tiny):
    x = images(h=40, w=56)
    with torch.no_grad():
        scores = hpsv2(tiny, resize="official")(x, PROMPTS)
        reference = reference_logits(tiny, x, PROMPTS, pixels=reference_official(x, 32)) / 50.0
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text, expected", [
    ("\u201ca cat\u201d &amp; dog  ", '"a cat" & dog'),
    ("  a\n\tred   car ", "a red car"),
    ("&amp;lt;b&amp;gt; bold", "<b> bold"),  # html.unescape twice
    ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # ftfy repairs mojibake
    ("Already Clean", "Already Clean"),  # case is left to the tokenizer
])
def test_clean_prompt_matches_open_clip(text, expected):
    assert clean_prompt(text) == expected == reference_clean(text)


def test_hpsv2_version_option(tiny, tmp_path):
    validate_reward_specs([{"name": "hpsv2", "version": "v2.0"}, {"name": "hpsv2", "label": "b", "version": "v2.1",
                                                                  "resize": "official"}], "rewards", allow_empty=False)
    for key, value, accepted in (("version", "v3", "v2.0, v2.1"), ("version", 2.1, "v2.0, v2.1"),
                                 ("resize", "nearest", "reference, official")):
        with pytest.raises(ConfigError, match=rf"^rewards\[0\]\.{key}: got {value!r}; accepted: {accepted}$"):
            validate_reward_specs([{"name": "hpsv2", key: value}], "rewards", allow_empty=False)
    # The other version's released file is refused at config load (weights differ, architecture does not).
    with pytest.raises(ConfigError, match=r"^rewards\[0\]\.version: got 'v2.1' but checkpoint .*HPS_v2_compressed.pt"):
        validate_reward_specs([{"name": "hpsv2", "checkpoint": "/m/HPS_v2_compressed.pt"}], "rewards",
                              allow_empty=False)
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt \\(version v2.0\\)"):
        hpsv2(tiny, checkpoint=None, version="v2.0")
    with pytest.raises(ValueError, match="set version: v2.1"):
        hpsv2(tiny, version="v2.0")  # the fixture's file is HPS_v2.1_compressed.pt
    v20 = tmp_path / HPS_FILES["v2.0"]
    v20.symlink_to(tiny["checkpoint"])
    reward = hpsv2(tiny, checkpoint=str(v20), version="v2.0")
    assert reward.version == "v2.0" and HPS_FILES["v2.0"] in reward.needs
    assert "HPS_v2_compressed.pt (version v2.0)" in HPSv2.needs
    assert "HPS_v2.1_compressed.pt (version v2.1" in HPSv2.needs


def test_hpsv2_rejects_unknown_missing_and_misshapen_keys(tiny, tmp_path):
    cases = {
        "unknown": ({**tiny["open_clip"], "visual.attnpool.weight": torch.zeros(1)}, "unmapped key"),
        "missing": ({k: v for k, v in tiny["open_clip"].items() if k != "ln_final.bias"}, "1 missing"),
        "shape": ({**tiny["open_clip"], "visual.proj": torch.zeros(32, 8)}, "1 shape mismatches"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(ValueError, match=message):
            hpsv2(tiny, checkpoint=str(path))


def test_missing_checkpoint_names_the_file_and_option(tiny, tmp_path):
    for path in (None, str(tmp_path / "nope.pt")):
        with pytest.raises(FileNotFoundError) as err:
            hpsv2(tiny, checkpoint=path)
        message = str(err.value)
        assert HPS_FILE in message and "checkpoint" in message and "huggingface.co/xswu/HPSv2" in message
        assert "\n" not in message


# --- full size (random weights) ---------------------------------------------------------------

def open_clip_vit_h14_shapes():
    """open_clip's ViT-H-14 state dict shapes, from its model config (not from transformers)."""
    width, text_width, embed, patches = 1280, 1024, 1024, (224 // 14) ** 2
    shapes = {
        "visual.conv1.weight": (width, 3, 14, 14), "visual.class_embedding": (width,),
        "visual.positional_embedding": (patches + 1, width), "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
        "visual.proj": (width, embed), "token_embedding.weight": (49408, text_width),
        "positional_embedding": (77, text_width), "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
        "text_projection": (text_width, embed), "logit_scale": (),
    }
    for prefix, w, layers in (("visual.transformer", width, 32), ("transformer", text_width, 24)):
        for i in range(layers):
            a = f"{prefix}.resblocks.{i}"
            shapes.update({f"{a}.attn.in_proj_weight": (3 * w, w), f"{a}.attn.in_proj_bias": (3 * w,),
                           f"{a}.attn.out_proj.weight": (w, w), f"{a}.attn.out_proj.bias": (w,),
                           f"{a}.ln_1.weight": (w,), f"{a}.ln_1.bias": (w,), f"{a}.ln_2.weight": (w,),
                           f"{a}.ln_2.bias": (w,), f"{a}.mlp.c_fc.weight": (4 * w, w), f"{a}.mlp.c_fc.bias": (4 * w,),
                           f"{a}.mlp.c_proj.weight": (w, 4 * w), f"{a}.mlp.c_proj.bias": (w,)})
    return shapes


def random_open_clip_vit_h14(seed=0):
    """(key, tensor) of a random open_clip ViT-H-14 state dict, lazily and reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    for key, shape in open_clip_vit_h14_shapes().items():
        yield key, (torch.tensor(math.log(100.0)) if key == "logit_scale"
                    else torch.randn(shape, generator=generator) * 0.02)


def forward_backward_seconds(reward) -> float:
    x = images(batch=1, h=512, w=512, grad=True)
    start = time.perf_counter()
    score = reward(x, ["a photo of a cat"])
    score.sum().backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(score).all() and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    return elapsed


@pytest.mark.slow
def test_full_size_pickscore_vit_h14_forward_backward(tmp_path):
    """PickScore's architecture (ViT-H/14 CLIPModel, ~1B params) saved, loaded, one 512×512 image."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = vit_h14_config()
    config.text_config.eos_token_id = tokenizer.eos_token_id  # pool where the tiny tokenizer ends text
    start = time.perf_counter()
    with torch.no_grad():
        model = CLIPModel(config)
        assert 0.98e9 < sum(p.numel() for p in model.parameters()) < 0.99e9
        model.save_pretrained(tmp_path / "clip")
    del model
    gc.collect()
    built = time.perf_counter()
    reward = PickScore(model=str(tmp_path / "clip"), processor=str(tmp_path / "tokenizer"), local_files_only=True)
    loaded = time.perf_counter()
    seconds = forward_backward_seconds(reward)
    print(f"\nPickScore ViT-H/14: build+save {built - start:.1f} s, load {loaded - built:.1f} s, "
          f"forward+backward (1×512²) {seconds:.1f} s")


@pytest.mark.slow
def test_full_size_hpsv2_vit_h14_round_trip_forward_backward(tmp_path):
    """An open_clip ViT-H-14 state dict (shapes from open_clip's config) → the built-in config → back, exactly."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    state = dict(random_open_clip_vit_h14())
    assert 0.98e9 < sum(v.numel() for v in state.values()) < 0.99e9
    path = tmp_path / HPS_FILE
    torch.save({"state_dict": state}, path)
    del state
    gc.collect()
    start = time.perf_counter()
    reward = HPSv2(checkpoint=str(path), tokenizer=str(tmp_path / "tokenizer"), local_files_only=True)
    loaded = time.perf_counter()
    reward.clip.text_model.eos_token_id = tokenizer.eos_token_id  # built-in config pools at CLIP's 49407
    with torch.no_grad():
        back = transformers_to_open_clip(reward.clip.state_dict(), 32, 24)
        assert set(back) == set(open_clip_vit_h14_shapes())
        for key, expected in random_open_clip_vit_h14():  # regenerated one tensor at a time: no second copy
            assert torch.equal(back[key], expected), key
        del back
    gc.collect()
    seconds = forward_backward_seconds(reward)
    print(f"\nHPSv2 ViT-H/14: load {loaded - start:.1f} s, forward+backward (1×512²) {seconds:.1f} s")
