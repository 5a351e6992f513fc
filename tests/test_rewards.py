"""Analytic rewards and the weighted combination: shapes, gradients, batch = single, validation."""

from __future__ import annotations

import json

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
    mix = build_rewards([{"name": "brightness", "weight": 1.0, "normalize": True},
                         {"name": "saturation", "weight": 0.0}])
    history = torch.tensor([[0.2, 0.0], [0.4, 0.0], [0.6, 0.0]])
    mix.update_stats(history)
    x = images()
    total, parts = mix(x, [""] * 3)
    mean, std = history[:, 0].mean(), history[:, 0].std()
    torch.testing.assert_close(total, (parts["brightness"] - mean) / (std + 1e-6))
    assert mix.stats["brightness"][0] == 3 and mix.stats["brightness"][3] == 1  # 3 images, one update


def test_ema_statistics_equal_a_hand_computed_ema():
    d = 0.9
    mix = build_rewards([{"name": "brightness", "normalize": True, "normalize_decay": d}])
    steps = [[0.2, 0.4, 0.6], [0.5, 0.9, 0.7], [0.1, 0.3, 0.2]]
    for block in steps:
        mix.update_stats(torch.tensor(block)[:, None])
    # By hand: first step sets (mean, var); then mean' = d·mean + (1−d)·mean_b and
    # var' = d·var + (1−d)·var_b + d·(1−d)·(mean_b − mean)² (unbiased batch variances).
    mean, var = 0.4, 0.04
    mean, var = d * mean + 0.1 * 0.7, d * var + 0.1 * 0.04 + d * 0.1 * (0.7 - 0.4) ** 2
    mean2 = d * mean + 0.1 * 0.2
    var = d * var + 0.1 * 0.01 + d * 0.1 * (0.2 - mean) ** 2
    count, got_mean, got_var, updates = mix.stats["brightness"]  # [images, mean, var, steps]
    assert (count, updates) == (9, 3)
    assert got_mean == pytest.approx(mean2, abs=1e-7) and got_var == pytest.approx(var, abs=1e-7)  # float32 scores
    x = images()
    total, parts = mix(x, [""] * 3)
    torch.testing.assert_close(total, (parts["brightness"] - mean2) / (var ** 0.5 + 1e-6))
    # JSON round trip (how the recipe checkpoints them) restores the same normalisation.
    again = build_rewards([{"name": "brightness", "normalize": True, "normalize_decay": d}])
    again.stats.update(json.loads(json.dumps(mix.stats)))
    torch.testing.assert_close(again(x, [""] * 3)[0], total)


@pytest.mark.parametrize("decay", [None, 0])
def test_no_decay_keeps_all_history_statistics(decay):
    mix = build_rewards([{"name": "brightness", "normalize": True, "normalize_decay": decay}])
    history = torch.rand(10, generator=torch.Generator().manual_seed(3))
    for block in (history[:1], history[1:4], history[4:]):
        mix.update_stats(block[:, None])
    count, mean, var, updates = mix.stats["brightness"]
    assert (count, updates) == (10, 3)
    assert mean == pytest.approx(float(history.double().mean()), abs=1e-7)
    assert var == pytest.approx(float(history.double().var()), abs=1e-7)
    # An older checkpoint's [count, mean, M2] still restores.
    old = build_rewards([{"name": "brightness", "normalize": True, "normalize_decay": decay}])
    old.stats.update({"brightness": [10, mean, var * 9]})
    x = images()
    torch.testing.assert_close(old(x, [""] * 3)[0], mix(x, [""] * 3)[0])


def test_first_step_normalises_with_gathered_statistics():
    mix = build_rewards([{"name": "brightness", "normalize": True}, {"name": "saturation", "weight": 0.5},
                         {"name": "colorfulness", "weight": 2.0, "normalize": True}])
    x = images()
    other_rank = torch.tensor([[0.9, 0.1], [0.05, 0.7]])  # (brightness, colorfulness) of another rank's images
    calls = []

    def gather(block):
        calls.append(block)
        assert not block.requires_grad
        return torch.cat([block, other_rank])

    total, parts = mix(x, [""] * 3, gather=gather)
    assert len(calls) == 1 and calls[0].shape == (3, 2)  # one collective for all normalised components
    expected = 0.5 * parts["saturation"]
    for j, label, w in ((0, "brightness", 1.0), (1, "colorfulness", 2.0)):
        everyone = torch.cat([parts[label].detach(), other_rank[:, j]])
        expected = expected + w * (parts[label] - everyone.mean()) / (everyone.std() + 1e-6)
    torch.testing.assert_close(total, expected)
    local, _ = mix(x, [""] * 3)  # without gather: this batch only, which differs
    assert (local - total).abs().max() > 1e-4
    mix.update_stats(torch.stack(list(parts.values()), dim=1).detach())
    mix(x, [""] * 3, gather=gather)
    assert len(calls) == 1, "running statistics exist: no gather"


@pytest.mark.parametrize("value", [1.0, -0.1, "fast", True])
def test_bad_normalize_decay(value):
    with pytest.raises(ConfigError, match=r"^rewards\[0\]\.normalize_decay: got .*; accepted: a number in \[0, 1\)"):
        validate_reward_specs([{"name": "brightness", "normalize": True, "normalize_decay": value}], "rewards",
                              allow_empty=False)
    validate_reward_specs([{"name": "brightness", "normalize": True, "normalize_decay": None}], "rewards",
                          allow_empty=False)


def test_true_jpeg_size_is_an_eval_only_reward():
    validate_reward_specs([{"name": "jpeg_size"}], "eval_rewards", allow_empty=True)
    message = (r"^rewards\[0\]\.name: 'jpeg_size' has no gradient; accepted in eval_rewards, or as a training reward "
               r"with trainer.algorithm=ddpo")
    with pytest.raises(ConfigError, match=message):
        validate_reward_specs([{"name": "jpeg_size"}], "rewards", allow_empty=False)
    noisy, flat = torch.rand(1, 3, 32, 32), torch.full((1, 3, 32, 32), 0.5)
    reward = build_reward({"name": "jpeg_size"})
    assert reward(flat, [""]) > reward(noisy, [""]), "smaller files score higher"
