"""Differentiable rewards: the `Reward` interface (base.py), one lookup dict and the weighted
combination (catalogue.py), one file per reward family.

    rewards = build_rewards([{"name": "brightness", "weight": 1.0}])
    total, parts = rewards(images, prompts)      # images: B×3×H×W in [0, 1]
"""

from .base import Reward, WeightedRewards
from .catalogue import REWARDS, build_reward, build_rewards, check_reward_files, describe_rewards, validate_reward_specs
from .analytic import Brightness, Colorfulness, Saturation
from .aesthetic import Aesthetic
from .compressibility import Compressibility, JpegSize, jpeg_size_bytes
from .object_count import ObjectCount
from .preference import HPSv2, PickScore
from .toy import (ToyBackgroundMatch, ToyColor, ToyColorMatch, ToyCount, ToyCountExact, ToyCountJudge,
                  ToyShapeMatch)

__all__ = ["REWARDS", "Reward", "WeightedRewards", "build_reward", "build_rewards", "check_reward_files",
           "describe_rewards", "validate_reward_specs",
           "Brightness", "Colorfulness", "Saturation", "Aesthetic", "Compressibility", "JpegSize",
           "jpeg_size_bytes", "ObjectCount", "HPSv2", "PickScore", "ToyColor", "ToyColorMatch",
           "ToyCount", "ToyCountExact", "ToyCountJudge", "ToyShapeMatch", "ToyBackgroundMatch"]
