"""Analytic rewards and the weighted combination: shapes, gradients, batch = single, validation."""

from __future__ import annotations

import pytest
import torch

from alignprop.platform.config import ConfigError
from alignprop.rewards import build_reward, build_rewards, validate_reward_specs

ANALYTIC = ["brightness", "saturation", "colorfulness"]


def images(b=3, seed=0):
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ANALYTIC)
def test_shape_gradient_and_batch_equals_single(name):
    reward = build_reward({"name": name})
    x = images().requires_grad_(True)
    scores = reward(x, ["a"] * 3)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    singles = torch.cat([reward(x[i:i + 1].detach(), ["a"]) for i in range(3)])
    torch.testing.assert_close(scores.detach(), singles)


def test_rewards_order_images_as_expected():
    grey, vivid = torch.full((1, 3, 8, 8), 0.5), torch.zeros(1, 3, 8, 8)
    vivid[:, 0] = 1.0  # pure red
    assert build_reward({"name": "saturation"})(vivid, [""]) > build_reward({"name": "saturation"})(grey, [""])
    assert build_reward({"name": "colorfulness"})(vivid, [""]) > build_reward({"name": "colorfulness"})(grey, [""])
    assert build_reward({"name": "brightness"})(torch.ones(1, 3, 4, 4), [""]).item() == pytest.approx(1.0)
    target = build_reward({"name": "brightness", "target": 0.25})
    assert target(grey, [""]).item() == pytest.approx(-0.25)


def test_weighted_sum_reports_each_component():
    mix = build_rewards([{"name": "brightness", "weight": 2.0}, {"name": "saturation", "weight": -0.5},
                         {"name": "brightness", "label": "dim", "target": 0.0}])
    x = images()
    total, parts = mix(x, [""] * 3)
    assert list(parts) == ["brightness", "saturation", "dim"]
    torch.testing.assert_close(total, 2.0 * parts["brightness"] - 0.5 * parts["saturation"] + parts["dim"])


def test_reward_rejects_non_rgb_batches():
    with pytest.raises(ValueError, match="B×3×H×W"):
        build_reward({"name": "brightness"})(torch.rand(3, 16, 16), [""])


@pytest.mark.parametrize("specs, field", [
    ([{"weight": 1}], "rewards[0]"),
    ([{"name": "sharpness"}], "rewards[0].name"),
    ([{"name": "brightness", "weight": "a lot"}], "rewards[0].weight"),
    ([{"name": "brightness"}, {"name": "brightness"}], "rewards[1].label"),
    ([{"name": "saturation", "target": 1}], "rewards[0].target"),
])
def test_bad_reward_specs(specs, field):
    with pytest.raises(ConfigError, match=rf"^{__import__('re').escape(field)}[.:]? ?"):
        validate_reward_specs(specs, "rewards", allow_empty=False)


def test_normalised_component_uses_running_statistics():
    mix = build_rewards([{"name": "brightness", "weight": 1.0, "normalize": True}, {"name": "saturation", "weight": 0.0}])
    history = torch.tensor([[0.2, 0.0], [0.4, 0.0], [0.6, 0.0]])
    mix.update_stats(history)
    x = images()
    total, parts = mix(x, [""] * 3)
    mean, std = history[:, 0].mean(), history[:, 0].std()
    torch.testing.assert_close(total, (parts["brightness"] - mean) / (std + 1e-6))
    assert mix.stats["brightness"][0] == 3


def test_true_jpeg_size_is_an_eval_only_reward():
    validate_reward_specs([{"name": "jpeg_size"}], "eval_rewards", allow_empty=True)
    with pytest.raises(ConfigError, match=r"^rewards\[0\]\.name: 'jpeg_size' has no gradient; accepted in eval_rewards only"):
        validate_reward_specs([{"name": "jpeg_size"}], "rewards", allow_empty=False)
    noisy, flat = torch.rand(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5)
    reward = build_reward({"name": "jpeg_size"})
    assert reward(flat, [""]) > reward(noisy, [""]), "smaller files score higher"
