"""Tiny offline pipelines for tests, the demo's base and `alignprop bench`: random, seeded weights, no
download. The SD 1.x-shaped one is here (NOTES.md: ~1M-param UNet, 32×32 images); the SDXL- and
SD3-shaped ones in tiny_families.py.

    alignprop tiny-model /tmp/tiny-sd          # save the tiny pipeline as a diffusers directory
    StableDiffusionPipeline.from_pretrained("/tmp/tiny-sd", local_files_only=True)
    alignprop tiny-model /tmp/tiny-sd3 --family sd3
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ...trainers.families import get_family
from .tiny_families import build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline


TINY_SEED = 0  # the tiny pipeline's weights are a pure function of this seed: every worker agrees


def bytes_to_unicode() -> dict[int, str]:
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
def tiny_tokenizer_files() -> tuple[str, str]:
    """A byte-level CLIP vocabulary (every byte, alone and word-final; no merges), written once."""
    folder = Path(tempfile.gettempdir()) / f"alignprop-tiny-tokenizer-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab = json.dumps({t: i for i, t in enumerate(tokens)})
    for path, text in ((vocab_file, vocab), (merges_file, "#version: 0.2\n")):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # every process writes them: another may be reading
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(vocab_file), str(merges_file)


def build_tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    vocab_file, merges_file = tiny_tokenizer_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_unet() -> UNet2DConditionModel:
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
        unet = tiny_unet()
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
    """The tiny pipeline of a family: sd (above), sdxl or sd3 (platform/models/tiny_families.py)."""
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
