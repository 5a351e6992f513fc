"""Differentiable rewards: `Reward` modules, one lookup dict, and the weighted combination.

    rewards = build_rewards([{"name": "brightness", "weight": 1.0}])
    total, parts = rewards(images, prompts)      # images: B×3×H×W in [0, 1]
"""

from alignprop.rewards.base import Reward, WeightedRewards, build_reward, build_rewards, validate_reward_specs
from alignprop.rewards.analytic import Brightness, Colorfulness, Saturation
from alignprop.rewards.aesthetic import Aesthetic
from alignprop.rewards.compressibility import Compressibility, JpegSize, jpeg_size_bytes
from alignprop.rewards.object_count import ObjectCount
from alignprop.rewards.preference import HPSv2, PickScore
from alignprop.rewards.toy import ToyColor, ToyColorMatch, ToyCount, ToyCountExact

__all__ = ["Reward", "WeightedRewards", "build_reward", "build_rewards", "validate_reward_specs",
           "Brightness", "Colorfulness", "Saturation", "Aesthetic", "Compressibility", "JpegSize",
           "jpeg_size_bytes", "ObjectCount", "HPSv2", "PickScore", "ToyColor", "ToyColorMatch",
           "ToyCount", "ToyCountExact"]
