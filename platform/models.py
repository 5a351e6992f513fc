"""Build the diffusion pipeline a run trains: a hub id / local diffusers directory, or a tiny
pipeline of its family built offline from configs (random weights), plus LoRA on its denoiser
(the UNet of sd/sdxl, the transformer of sd3; see trainers/families.py).

    alignprop tiny-model /tmp/tiny-sd          # save the tiny pipeline as a diffusers directory
    StableDiffusionPipeline.from_pretrained("/tmp/tiny-sd", local_files_only=True)
    alignprop tiny-model /tmp/tiny-sd3 --family sd3
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from alignprop.platform.config import ConfigError, LoraSection, ModelSection, model_path
from alignprop.platform.quiet import loading_bars_off
from alignprop.trainers.families import FAMILY_NAMES, PIPELINE_FAMILIES, family_of_denoiser, get_family, pipeline_class

TINY_SEED = 0  # the tiny pipeline's weights are a pure function of this seed: every worker agrees
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _tiny_tokenizer_files() -> tuple[str, str]:
    """A byte-level CLIP vocabulary (every byte, alone and word-final; no merges), written once."""
    folder = Path(tempfile.gettempdir()) / f"alignprop-tiny-tokenizer-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    for path, text in ((vocab_file, json.dumps({t: i for i, t in enumerate(tokens)})), (merges_file, "#version: 0.2\n")):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # every process writes them: another may be reading
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(vocab_file), str(merges_file)


def build_tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    vocab_file, merges_file = _tiny_tokenizer_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length, pad_token="<|endoftext|>")


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    )


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """The SD-shaped pipeline of NOTES.md (~1M-param UNet, 32×32 images), deterministic weights."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = _tiny_unet()
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=32,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def cast_modules(parts, dtype: torch.dtype) -> None:
    """The modules among `parts` to `dtype` in place, with nn.Module.to: diffusers' own `.to` warns
    "modules ... should be kept in float32: []" on every cast of these classes."""
    for part in parts:
        if isinstance(part, torch.nn.Module) and dtype != torch.float32:
            torch.nn.Module.to(part, dtype=dtype)


def build_tiny(family: str = "sd", t5: bool = True):
    """The tiny pipeline of a family: sd (above), sdxl or sd3 (platform/tiny_families.py)."""
    from alignprop.platform.tiny_families import build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

    if family == "sdxl":
        pipe = build_tiny_sdxl_pipeline(build_tiny_tokenizer(), TINY_SEED)
    elif family == "sd3":
        pipe = build_tiny_sd3_pipeline(build_tiny_tokenizer(), TINY_SEED, t5=t5)
    else:
        pipe = build_tiny_pipeline()
    for part in pipe.components.values():  # as from_pretrained leaves them: no dropout at inference
        if isinstance(part, torch.nn.Module):
            part.eval()
    return pipe


def save_tiny_pipeline(directory: str | os.PathLike, family: str = "sd") -> Path:
    """`alignprop tiny-model DIR [--family sd|sdxl|sd3]`: a diffusers directory that the family's
    pipeline class loads offline with `from_pretrained`."""
    get_family(family)
    build_tiny(family).save_pretrained(directory, safe_serialization=True)
    return Path(directory)


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
            with warnings.catch_warnings():  # huggingface_hub: "local_dir_use_symlinks is deprecated" (diffusers passes it)
                warnings.simplefilter("ignore", UserWarning)
                index = DiffusionPipeline.load_config(name, revision=revision, local_files_only=local_only)
    except (OSError, ValueError):
        return None
    cls = index.get("_class_name", "")
    if cls not in PIPELINE_FAMILIES:
        raise ConfigError(f"model.pretrained: {name!r} is a {cls or 'pipeline without _class_name'}; accepted: "
                          f"{', '.join(PIPELINE_FAMILIES)} (model.family {', '.join(FAMILY_NAMES)})")
    return PIPELINE_FAMILIES[cls]


def resolve_family(model: ModelSection, local_only: bool = True) -> str | None:
    """model.family, or (auto) the pipeline's: sd for model.tiny, else read from model_index.json."""
    if model.family != "auto":
        return model.family
    if model.tiny or model.arch:
        return "sd"
    return pretrained_family(model.pretrained, model.revision, local_only)


def load_pipeline(model: ModelSection, device: torch.device | str | None = None):
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
        from alignprop.platform.arches import build_arch_pipeline

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


def add_lora(unet: torch.nn.Module, lora: LoraSection) -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA adapter (fp32) to the frozen denoiser (UNet or transformer); returns
    its parameters."""
    unet.add_adapter(LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout, init_lora_weights="gaussian" if lora.init == "gaussian" else True,
    ))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' key format, ready for `save_lora_weights` (a UNet's keys converted
    as diffusers' SD/SDXL LoRA scripts do; a transformer's as peft gives them, as its SD3 script)."""
    state = get_peft_model_state_dict(unet)
    if family_of_denoiser(unet).denoiser_name == "unet":
        state = convert_state_dict_to_diffusers(state)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write `pytorch_lora_weights.safetensors`, loadable by the family's pipeline:
    `pipe.load_lora_weights(directory)` (StableDiffusion[XL|3]Pipeline)."""
    family = family_of_denoiser(unet)
    prefix = family.lora_prefix
    pipeline_class(family).save_lora_weights(directory, safe_serialization=True, **{
        f"{prefix}_lora_layers": lora_state_dict(unet),
        # rank/alpha/targets in the safetensors metadata: without it a loader assumes alpha = rank
        f"{prefix}_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    })
    return Path(directory) / LORA_WEIGHTS_NAME


@lru_cache(maxsize=8)
def denoiser_module_names(family: str, tiny: bool, pretrained: str | None, revision: str | None = None,
                          arch: str | None = None) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """(every module name, the distinct leaf names of its Linear layers) of the run's denoiser (UNet
    or transformer): what `lora.target_modules` must match. Built on the meta device from the config
    alone; None for a hub id whose config is not in the local cache (the worker then checks)."""
    from diffusers import SD3Transformer2DModel

    from alignprop.platform.tiny_families import tiny_sd3_transformer, tiny_sdxl_unet

    sub = get_family(family).denoiser_name
    cls = SD3Transformer2DModel if sub == "transformer" else UNet2DConditionModel
    pretrained = model_path(pretrained) if pretrained else pretrained
    path = Path(str(pretrained)).expanduser()
    try:
        if tiny:
            config = None
        elif arch:
            from alignprop.platform.arches import arch_denoiser_config

            config = arch_denoiser_config(arch)
        elif path.is_dir():
            config = cls.load_config(str(path / sub))
        else:
            config = cls.load_config(str(pretrained), subfolder=sub, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        if tiny:
            model = {"sd": _tiny_unet, "sdxl": tiny_sdxl_unet, "sd3": tiny_sd3_transformer}[family]()
        else:
            model = cls.from_config(config)
    modules = dict(model.named_modules())
    leaf = lambda name: ".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]  # noqa: E731
    linear = sorted({leaf(n) for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
    return frozenset(modules), tuple(linear)
