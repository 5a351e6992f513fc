"""The `dtype` option of model-backed rewards: bf16 weights, float32 pixels and scores (CPU, offline).

Every reward that loads a network is built from the small random-weight models the other reward
tests save (tiny CLIP / OWL-ViT; the shipped toy-world CNNs), once in float32 and once in bf16.
"""

import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, OwlViTConfig, OwlViTForObjectDetection

from alignprop.platform.config import ConfigError
from alignprop.platform.models import build_tiny_tokenizer
from alignprop.rewards import Aesthetic, build_reward, build_rewards, validate_reward_specs
from alignprop.rewards.aesthetic import MLP_FILE
from alignprop.rewards import describe_rewards
from alignprop.rewards.base import DTYPE_CHOICES
from alignprop.rewards.preference import HPS_FILE
from test_reward_aesthetic import TINY_TEXT, TINY_VISION, save_mlp
from test_reward_object_count import save_detector
from test_reward_preference import tiny_config, transformers_to_open_clip

PROMPTS = ["two red circles on a white background"] * 4  # a count, an object and a colour for every reward
MODEL_BACKED = ["aesthetic", "pickscore", "hpsv2", "object_count", "toy_count", "toy_color"]
# max |bf16 − float32 score| / max |float32 score| on a batch; the largest measured over 10 seeds in comments.
# bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 %), compounded through the layers:
BF16_TOLERANCE = {
    "pickscore": 2e-2, "hpsv2": 2e-2, "toy_count": 2e-2,  # ≤ 0.7 %
    "toy_color": 5e-2,  # ≤ 1.7 %: a small softmax share carries its logits' absolute bf16 error (~2^-8·|logit|)
    # ≤ 6 %: the random linear MLP's score (~1e-2) is what cancels out of terms summing to ~0.22; ≤ 0.3 % of those
    "aesthetic": 1e-1,
    "object_count": 1e-1,  # ≤ 7 %: the soft step (temperature 4 at p = 0.5) sums each box's bf16 logit error
}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """One spec per model-backed reward, on tiny random-weight models saved as the reward tests do."""
    root = tmp_path_factory.mktemp("dtype")
    torch.manual_seed(0)
    aesthetic = CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16))
    aesthetic.save_pretrained(root / "aesthetic")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    config = tiny_config(tokenizer)
    config.save_pretrained(root / "config")
    torch.manual_seed(0)
    clip = CLIPModel(config)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(50.0))
    clip.save_pretrained(root / "clip")
    torch.save(transformers_to_open_clip(clip.state_dict(), 2, 2), root / HPS_FILE)
    local = {"local_files_only": True}
    return {
        "aesthetic": {"name": "aesthetic", "clip_model": str(root / "aesthetic"),
                      "mlp_path": save_mlp(root / MLP_FILE, 16), **local},
        "pickscore": {"name": "pickscore", "model": str(root / "clip"), "processor": str(root / "tokenizer"), **local},
        "hpsv2": {"name": "hpsv2", "checkpoint": str(root / HPS_FILE), "tokenizer": str(root / "tokenizer"),
                  "config": str(root / "config"), **local},
        "object_count": {"name": "object_count", "threshold": 0.5, "temperature": 4.0, **local,
                         "model": save_detector(root / "owlvit", OwlViTConfig, OwlViTForObjectDetection)},
        "toy_count": {"name": "toy_count"},
        "toy_color": {"name": "toy_color"},
    }


@pytest.fixture(scope="module")
def built(specs):
    """{name: (float32 reward, bf16 reward)}: build_rewards without a dtype, and with the worker's bf16."""
    f32 = build_rewards(list(specs.values()))
    bf16 = build_rewards(list(specs.values()), dtype=torch.bfloat16)
    return {name: (a, b) for name, a, b in zip(f32.labels, f32.rewards, bf16.rewards)}


def images(grad=False):
    torch.manual_seed(2)
    return torch.rand(4, 3, 40, 48).requires_grad_(grad)


def floating(reward):
    return [t for t in (*reward.parameters(), *reward.buffers()) if t.is_floating_point()]


def dtypes(reward):
    return {t.dtype for t in floating(reward)}


@pytest.mark.parametrize("name", MODEL_BACKED)
def test_bf16_weights_float32_scores_close_to_float32(built, name):
    f32, bf16 = built[name]
    assert f32.compute_dtype == torch.float32 and dtypes(f32) == {torch.float32}
    assert bf16.compute_dtype == torch.bfloat16 and dtypes(bf16) == {torch.bfloat16}
    with torch.no_grad():
        a, b = f32(images(), PROMPTS), bf16(images(), PROMPTS)
    assert a.dtype == b.dtype == torch.float32 and torch.isfinite(b).all()
    error = ((b - a).abs().max() / a.abs().max()).item()
    assert error <= BF16_TOLERANCE[name], f"{name}: bf16 off by {error:.3%} of the largest score"


@pytest.mark.parametrize("name", MODEL_BACKED)
def test_bf16_gradient_reaches_float32_pixels(built, name):
    grads = []
    for reward in built[name]:
        x = images(grad=True)
        reward(x, PROMPTS).sum().backward()
        grads.append(x.grad)
    assert grads[1] is not None and grads[1].dtype == torch.float32
    assert torch.isfinite(grads[1]).all() and grads[1].abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in built[name][1].parameters())
    # Same direction as float32's (measured cosine ≥ 0.999).
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.99


def test_auto_follows_the_worker_and_explicit_values_win(specs):
    spec = specs["aesthetic"]
    assert dtypes(build_reward(spec)) == {torch.float32}  # no worker dtype: float32
    assert dtypes(build_reward({**spec, "dtype": "auto"}, torch.bfloat16)) == {torch.bfloat16}
    assert dtypes(build_reward({**spec, "dtype": "float32"}, torch.bfloat16)) == {torch.float32}
    assert dtypes(build_reward({**spec, "dtype": "bfloat16"})) == {torch.bfloat16}
    assert dtypes(Aesthetic(**{k: v for k, v in spec.items() if k != "name"})) == {torch.float32}
    # Analytic rewards have no network and no option: float32 whatever the worker's dtype.
    analytic = build_rewards([{"name": "brightness"}, {"name": "compressibility"}], dtype=torch.bfloat16)
    assert all(r.compute_dtype == torch.float32 for r in analytic.rewards)
    assert analytic.rewards[1].dct.dtype == torch.float32
    assert analytic(images(), PROMPTS)[0].dtype == torch.float32


@pytest.mark.parametrize("name", MODEL_BACKED)
def test_bad_dtype_is_refused_at_config_load(specs, name):
    assert DTYPE_CHOICES == ("auto", "float32", "bfloat16", "float16")
    message = r"^rewards\[0\]\.dtype: got 'fp8'; accepted: auto, float32, bfloat16, float16$"
    with pytest.raises(ConfigError, match=message):
        validate_reward_specs([{**specs[name], "dtype": "fp8"}], "rewards", allow_empty=False)
    validate_reward_specs([{**specs[name], "dtype": "bfloat16"}], "rewards", allow_empty=False)


def test_analytic_rewards_take_no_dtype_and_rewards_list_still_works():
    with pytest.raises(ConfigError, match=r"^rewards\[0\]\.dtype: unknown option of reward 'brightness'"):
        validate_reward_specs([{"name": "brightness", "dtype": "bfloat16"}], "rewards", allow_empty=False)
    rows = {row["name"]: row for row in describe_rewards()}
    assert set(MODEL_BACKED) <= set(rows) and not any("dtype" in row["weights"] for row in rows.values())
