"""The frozen base pipeline a run trains: a hub id, a local diffusers directory, the shipped toy world,
a tiny pipeline (tiny.py) or a full-size architecture with random weights (full_size.py), with its
family's training scheduler; and what `lora.target_modules` must match in its denoiser.

    pipe = load_pipeline(cfg.model, device)
    pretrained_family("/models/sdxl")     # sdxl, from model_index.json's _class_name
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel

from ...trainers.families import FAMILY_NAMES, PIPELINE_FAMILIES, get_family, pipeline_class
from ..console import loading_bars_off
from ..errors import ConfigError
from ..toy_world.scenes import SHIPPED_DIR
from .tiny import TINY_SEED, build_tiny, cast_modules, tiny_unet
from .full_size import arch_denoiser_config, build_arch_pipeline
from .tiny_families import tiny_sd3_transformer, tiny_sdxl_unet

if TYPE_CHECKING:  # the config's model section; models sit below config in the import layers
    from ..config import ModelSection

TOY_WORLD_MODEL = "toy-world"  # model.pretrained naming the shipped toy-world pipeline


def model_path(name: str) -> str:
    """`toy-world` → the shipped toy-world pipeline's directory (resolved where it is loaded: the
    package may sit elsewhere on each node); anything else as given."""
    return str(SHIPPED_DIR) if name == TOY_WORLD_MODEL else name


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pretrained_family(name: str, revision: str | None = None, local_only: bool = True) -> str | None:
    """The family of a pipeline directory or hub id, from its model_index.json's `_class_name`;
    None when that file cannot be read here (a hub id not in the local cache, with `local_only`)."""
    from diffusers import DiffusionPipeline

    name = model_path(name)
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text())
        else:
            # huggingface_hub: "local_dir_use_symlinks is deprecated" (diffusers passes it)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                index = DiffusionPipeline.load_config(name, revision=revision, local_files_only=local_only)
    except (OSError, ValueError):
        return None
    cls = index.get("_class_name", "")
    if cls not in PIPELINE_FAMILIES:
        raise ConfigError(f"model.pretrained: {name!r} is a {cls or 'pipeline without _class_name'}; accepted: "
                          f"{', '.join(PIPELINE_FAMILIES)} (model.family {', '.join(FAMILY_NAMES)})")
    return PIPELINE_FAMILIES[cls]


def resolve_family(model: "ModelSection", local_only: bool = True) -> str | None:
    """model.family, or (auto) the pipeline's: sd for model.tiny, else read from model_index.json."""
    if model.family != "auto":
        return model.family
    if model.tiny or model.arch:
        return "sd"
    return pretrained_family(model.pretrained, model.revision, local_only)


def load_pipeline(model: "ModelSection", device: torch.device | str | None = None):
    """The frozen base pipeline named by the config, with its family's training scheduler (DDIM
    for sd/sdxl, flow-matching Euler for sd3), in eval mode. `device`: where `model.arch`'s random
    weights are initialised (on a GPU in a second instead of a minute of CPU); the caller moves the
    pipeline there either way."""
    dtype = DTYPES[model.dtype]
    family = get_family(resolve_family(model, local_only=False))
    if model.tiny:
        pipe = build_tiny(family.name, t5=model.t5)
        cast_modules(pipe.components.values(), dtype)
    elif model.arch:
        with torch.device(device or "cpu"):
            pipe = build_arch_pipeline(model.arch, seed=TINY_SEED, dtype=dtype)
    else:
        name = model_path(model.pretrained)
        local = Path(name).expanduser().is_dir()
        with loading_bars_off():
            pipe = pipeline_class(family).from_pretrained(
                str(Path(name).expanduser()) if local else name, revision=model.revision, dtype=dtype,
                local_files_only=local, **family.load_kwargs(model),
            )
    pipe.scheduler = family.training_scheduler(pipe.scheduler)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; its pipeline upcasts it for every decode
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
            part.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=8)
def meta_denoiser(family: str, tiny: bool, pretrained: str | None, revision: str | None = None,
                  arch: str | None = None) -> torch.nn.Module | None:
    """The run's denoiser (UNet or transformer) on the meta device, from its config alone (no weights);
    None for a hub id whose config is not in the local cache (the worker then checks)."""
    from diffusers import SD3Transformer2DModel

    sub = get_family(family).denoiser_name
    cls = SD3Transformer2DModel if sub == "transformer" else UNet2DConditionModel
    pretrained = model_path(pretrained) if pretrained else pretrained
    path = Path(str(pretrained)).expanduser()
    try:
        if tiny:
            config = None
        elif arch:
            config = arch_denoiser_config(arch)
        elif path.is_dir():
            config = cls.load_config(str(path / sub))
        else:
            config = cls.load_config(str(pretrained), subfolder=sub, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        if tiny:
            return {"sd": tiny_unet, "sdxl": tiny_sdxl_unet, "sd3": tiny_sd3_transformer}[family]()
        return cls.from_config(config)


def _leaf(name: str) -> str:
    """A module's name as `lora.target_modules` may give it: its last part (`to_out.0`: the last two)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def denoiser_module_names(family: str, tiny: bool, pretrained: str | None, revision: str | None = None,
                          arch: str | None = None) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """(every module name, the distinct leaf names of its Linear layers) of the run's denoiser: what
    `lora.target_modules` must match; None when its config is not on this machine."""
    model = meta_denoiser(family, tiny, pretrained, revision, arch)
    if model is None:
        return None
    modules = dict(model.named_modules())
    linear = sorted({_leaf(n) for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
    return frozenset(modules), tuple(linear)


def lora_parameter_count(model: "ModelSection", lora) -> int | None:
    """The number of LoRA parameters `lora` (rank, target_modules) adds to the run's denoiser (peft's
    rule: a target names a module or a dotted suffix of its name); None when its config is not here."""
    family = resolve_family(model)
    denoiser = meta_denoiser(family, model.tiny, model.pretrained, model.revision, model.arch) if family else None
    if denoiser is None:
        return None
    count = 0
    for name, module in denoiser.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in lora.target_modules):
            continue
        if isinstance(module, torch.nn.Linear):
            count += lora.rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            count += lora.rank * (module.in_channels * kernel + module.out_channels)
    return count
