"""Typed run configuration: dataclass schema ← YAML preset ← `key=value` overrides, validated.

    cfg = load_config("tiny-cpu", ["optim.lr=3e-4", "truncation.k=5"])

| module | holds |
|---|---|
| `schema.py` | the sections (`RunConfig`, `ModelSection`, …): keys, types, defaults |
| `load.py` | `load_config`, presets, overrides, `run_name`, dict/YAML conversion |
| `validate.py` | cross-field checks on values |
| `checks.py` | checks of what the config names on this machine (files, model, LoRA targets, storage) |

Every error is a `ConfigError` whose message is one line naming the field and what is accepted;
it is raised on the driver before Ray starts. The presets are the YAML files in platform/configs/.
"""

from ..errors import ConfigError
from ..prompt_files import PROMPT_DIR, prompt_path, read_prompt_file
from .checks import check_paths
from ..models.full_size import ARCH_NAMES
from ..presets import PRESET_DIR, list_presets, resolve_preset
from .load import load_config, run_name
from .schema import (ALGORITHMS, CHECKPOINT_MODES, COMPILE_MODES, DTYPE_NAMES, FAMILY_CHOICES, SAFE_NAME,
                     SAFE_NAME_TEXT, TRACKING_SCHEMES, DDPOSection, DeepSpeedSection, DirectAlignSection,
                     DraftLVSection, DRTuneSection, LoraSection, ModelSection, OptimSection, PerfSection, RaySection,
                     ReFLSection, RunConfig, SamplingSection, TrackingSection, TrainerSection, TruncationSection,
                     flatten, from_dict, run_params, to_dict, to_yaml)
from .validate import refl_bounds, validate

__all__ = ["ALGORITHMS", "ARCH_NAMES", "CHECKPOINT_MODES", "COMPILE_MODES", "DTYPE_NAMES", "FAMILY_CHOICES",
           "PRESET_DIR",
           "PROMPT_DIR", "SAFE_NAME", "SAFE_NAME_TEXT", "TRACKING_SCHEMES", "ConfigError", "DDPOSection",
           "DeepSpeedSection", "DirectAlignSection", "DraftLVSection", "DRTuneSection", "LoraSection", "ModelSection",
           "OptimSection", "PerfSection",
           "RaySection", "ReFLSection", "RunConfig", "SamplingSection", "TrackingSection", "TrainerSection",
           "TruncationSection", "check_paths", "flatten", "from_dict", "list_presets", "load_config", "prompt_path",
           "read_prompt_file", "refl_bounds", "resolve_preset", "run_name", "run_params", "to_dict", "to_yaml",
           "validate"]
