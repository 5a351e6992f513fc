"""The LAION aesthetic reward on real transformers CLIP models with random weights (CPU, offline)."""

import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from alignprop.platform.config import ConfigError
from alignprop.rewards import Aesthetic, build_reward, validate_reward_specs
from alignprop.rewards.aesthetic import MLP_FILE, AestheticMLP
from alignprop.rewards.base import CLIP_MEAN, CLIP_STD

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
# No vision projection_dim on purpose: like a CLIPModel checkpoint whose vision_config keeps the
# default (512) while the real size is the top-level projection_dim.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)


def save_mlp(path, dim):
    torch.manual_seed(1)
    torch.save(AestheticMLP(dim).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    """A tiny CLIPModel and a random MLP saved to disk, as a reward spec."""
    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    return {"name": "aesthetic", "clip_model": str(root / "clip"), "mlp_path": save_mlp(root / MLP_FILE, 16),
            "local_files_only": True}


def images(batch=3, h=40, w=48, grad=False):
    torch.manual_seed(2)
    return torch.rand(batch, 3, h, w).requires_grad_(grad)


def test_mlp_keys_match_the_released_file():
    keys = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert set(AestheticMLP().state_dict()) == keys
    assert AestheticMLP().layers[0].in_features == 768


def test_scores_are_differentiable_wrt_pixels_only(tiny_spec):
    reward = build_reward(tiny_spec)
    assert isinstance(reward, Aesthetic) and not reward.training
    saved = CLIPModel.from_pretrained(tiny_spec["clip_model"], local_files_only=True)
    torch.testing.assert_close(reward.clip.visual_projection.weight, saved.visual_projection.weight)
    assert reward.mlp.layers[0].in_features == 16
    x = images(grad=True)
    scores = reward(x, ["a photo"] * 3)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_batch_equals_per_image_and_target_form(tiny_spec):
    reward = build_reward(tiny_spec)
    x = images()
    with torch.no_grad():
        batch = reward(x, ["p"] * 3)
        single = torch.cat([reward(x[i:i + 1], ["p"]) for i in range(3)])
        targeted = build_reward({**tiny_spec, "target": 10.0})(x, ["p"] * 3)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(targeted, -(10.0 - batch).abs())


def test_safetensors_mlp_gives_the_same_scores(tiny_spec, tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_file(torch.load(tiny_spec["mlp_path"], weights_only=True), str(path))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(build_reward({**tiny_spec, "mlp_path": str(path)})(x, ["p"] * 3),
                                   build_reward(tiny_spec)(x, ["p"] * 3))


def test_missing_mlp_names_the_file_and_option(tiny_spec, tmp_path):
    for path in (None, str(tmp_path / "nope.pth")):
        with pytest.raises(FileNotFoundError) as err:
            build_reward({**tiny_spec, "mlp_path": path})
        message = str(err.value)
        assert MLP_FILE in message and "mlp_path" in message and "\n" not in message


def test_direct_construction_freezes_itself(tiny_spec):
    reward = Aesthetic(**{k: v for k, v in tiny_spec.items() if k != "name"})
    assert not reward.training and not reward.clip.training and not reward.mlp.training
    assert not any(p.requires_grad for p in reward.parameters())
    x = images()
    torch.testing.assert_close(reward(x, ["p"] * 3), reward(x, ["p"] * 3))  # dropout off: deterministic


def test_official_resize_matches_the_alignprop_code(tiny_spec):
    """Official AlignProp (main.py aesthetic_loss_fn): torchvision Resize(224) on tensors under its
    torchvision 0.15.2 (bilinear, antialias off for tensors), shorter side, then Normalize; the
    centre crop (torchvision CenterCrop offsets) only matters for non-square images."""
    reward = build_reward({**tiny_spec, "resize": "official"})
    x = images(h=40, w=56)
    size = 32
    new_h, new_w = size, int(size * 56 / 40)
    ref = torch.nn.functional.interpolate(x, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=False)
    left = int(round((new_w - size) / 2.0))
    ref = ref[..., :, left:left + size]
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        embed = reward.clip(pixel_values=ref).image_embeds
        expected = reward.mlp(embed / embed.norm(dim=-1, keepdim=True)).squeeze(-1)
        scores = reward(x, ["p"] * 3)
        default = build_reward(tiny_spec)(x, ["p"] * 3)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (scores - default).abs().max() > 1e-6  # bilinear/no antialias differs from CLIP's bicubic
    with pytest.raises(ConfigError, match=r"^rewards\[0\]\.resize: got 'bicubic'; accepted: reference, official$"):
        validate_reward_specs([{**tiny_spec, "resize": "bicubic"}], "rewards", allow_empty=False)


def test_full_size_vit_l14_forward_backward(tmp_path):
    """ViT-L/14's real shapes (random weights), one 512×512 image; prints the time taken."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=768)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    spec = {"name": "aesthetic", "clip_model": str(tmp_path / "clip"),
            "mlp_path": save_mlp(tmp_path / MLP_FILE, 768), "local_files_only": True}
    start = time.perf_counter()
    reward = build_reward(spec)
    loaded = time.perf_counter()
    x = images(batch=1, h=512, w=512, grad=True)
    reward(x, ["p"]).sum().backward()
    done = time.perf_counter()
    print(f"\nViT-L/14 aesthetic: load {loaded - start:.1f} s, forward+backward (1×512²) {done - loaded:.1f} s")
    assert x.grad.abs().sum() > 0
