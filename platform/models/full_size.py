"""The published full-size Stable Diffusion architectures, built offline with random weights, so that
every path (memory, speed, sharding, checkpoint I/O) can run at real size without the hub.

    alignprop train --config tiny-cpu model.tiny=false model.arch=sd15 sampling.resolution=64

    from .full_size import build_arch_pipeline
    pipe = build_arch_pipeline("sd15", seed=0, dtype=torch.float16)   # a StableDiffusionPipeline
    pipe.save_pretrained("/tmp/sd15-random")                          # loads back offline

`arch_configs(arch)` holds the published component configs value by value (see the header above
`_SD15` and `_SD21` for the file each dict copies); the weights are random (the classes' own
initialisation under `torch.manual_seed(seed)`), so images are noise, but every shape, dtype and
parameter count is the real checkpoint's:

    | arch | UNet        | VAE        | text encoder | published (rounded)                     |
    |------|-------------|------------|--------------|-----------------------------------------|
    | sd15 | 859,520,964 | 83,653,863 | 123,060,480  | 859.5M / 83.7M / 123.1M (CLIP ViT-L/14) |
    | sd21 | 865,910,724 | 83,653,863 | 340,387,840  | 865.9M / 83.7M / 340.4M (OpenCLIP ViT-H) |

(measured here from these configs on the meta device; each equals the published count to the
digit: tests/test_arches.py.) Building on a 2-core CPU (OMP_NUM_THREADS=1) takes ~6 s for sd15 and
~8 s for sd21 in fp32 (4.3 / 5.2 GB of weights; the random init dominates), ~7 s in bf16 (built in
fp32, then cast); `load_pipeline` builds on the GPU when it has one.

The tokenizer: CLIP's real BPE vocabulary and merges are not available offline, so
`build_arch_tokenizer` makes a byte-level CLIP tokenizer (the 256 bytes, alone and word-final, no
merges) padded with filler entries to CLIP's real 49408 ids, with "<|startoftext|>" = 49406 and
"<|endoftext|>" = 49407 as in the real vocabulary, and the published pad token per arch
("<|endoftext|>" for SD 1.5, "!" = id 0 for SD 2.1, as in stabilityai/stable-diffusion-2-1's
tokenizer/special_tokens_map.json). It keeps shapes and special-token ids real, not the text → id
mapping: a real checkpoint (model.pretrained) brings its own tokenizer, and this one is only for the
random-weight builds.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tiny import bytes_to_unicode, cast_modules

ARCH_NAMES = ("sd15", "sd21")  # model.arch: the published architectures built here

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407  # CLIP's real ids of <|startoftext|> and <|endoftext|>
CLIP_MAX_LENGTH = 77

_CROSS_ATTN_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_CROSS_ATTN_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# The KL-f8 VAE of SD 1.x and 2.x (vae/config.json of both repos; only sample_size differs).
_KL_F8_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,  # class default
}

# ---------------------------------------------------------------------------------------------------
# stable-diffusion-v1-5/stable-diffusion-v1-5 (the mirror of runwayml/stable-diffusion-v1-5):
#   "unet"         copies unet/config.json                  (diffusers 0.6.0)
#   "vae"          copies vae/config.json                   (diffusers 0.6.0)
#   "text_encoder" copies text_encoder/config.json          (openai/clip-vit-large-patch14's text model)
#   "scheduler"    copies scheduler/scheduler_config.json   (PNDMScheduler; build DDIM from it with
#                                                             DDIMScheduler.from_config)
# Dropped: the metadata keys (_class_name, _diffusers_version, _name_or_path, architectures,
# model_type, torch_dtype, transformers_version) and text_encoder's "dropout": 0.0 (no CLIPTextConfig
# argument). Keys marked "class default" are not in the published file: they are the value the
# checkpoint loads with, written out so that nothing depends on a library's defaults.
# ---------------------------------------------------------------------------------------------------
_SD15 = {
    "unet": {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": list(_CROSS_ATTN_DOWN),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": list(_CROSS_ATTN_UP),
        "mid_block_type": "UNetMidBlock2DCrossAttn",  # class default
        "use_linear_projection": False,  # class default
        "upcast_attention": False,  # class default
    },
    "vae": {**_KL_F8_VAE, "sample_size": 512},
    "text_encoder": {
        "attention_dropout": 0.0,
        "bos_token_id": 0,  # sic: the published values (the tokenizer's ids are 49406/49407);
        "eos_token_id": 2,  # eos_token_id == 2 selects CLIPTextModel's legacy argmax pooling, as SD does
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408,
    },
    "scheduler": {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,  # a PNDM key: DDIMScheduler.from_config drops it silently (compatible class)
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
        "prediction_type": "epsilon",  # class default
    },
}

# ---------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-2-1 (768-v):
#   "unet"         copies unet/config.json                  (diffusers 0.10.0.dev0)
#   "vae"          copies vae/config.json                   (diffusers 0.8.0)
#   "text_encoder" copies text_encoder/config.json          (OpenCLIP ViT-H/14's text tower, 23 of its
#                                                             24 layers, as transformers' CLIPTextModel)
#   "scheduler"    copies scheduler/scheduler_config.json   (DDIMScheduler, v_prediction)
# Dropped and "class default": as for SD 1.5 above.
# ---------------------------------------------------------------------------------------------------
_SD21 = {
    "unet": {
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": list(_CROSS_ATTN_DOWN),
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 96,
        "up_block_types": list(_CROSS_ATTN_UP),
        "use_linear_projection": True,
        "upcast_attention": True,
        "mid_block_type": "UNetMidBlock2DCrossAttn",  # class default
    },
    "vae": {**_KL_F8_VAE, "sample_size": 768},  # SD 1.5's VAE architecture
    "text_encoder": {
        "attention_dropout": 0.0,
        "bos_token_id": 0,  # sic, as for SD 1.5
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "pad_token_id": 1,
        "projection_dim": 512,
        "vocab_size": 49408,
    },
    "scheduler": {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,  # in the published DDIM file too; dropped by from_config
        "steps_offset": 1,
        "trained_betas": None,
    },
}

_CONFIGS = {"sd15": _SD15, "sd21": _SD21}
_PAD_TOKENS = {"sd15": "<|endoftext|>", "sd21": "!"}  # each published tokenizer's special_tokens_map.json


def _check(arch: str) -> str:
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; accepted: {', '.join(ARCH_NAMES)}")
    return arch


def arch_configs(arch: str) -> dict[str, dict]:
    """The published configs of `arch` ("unet", "vae", "text_encoder", "scheduler"): plain dicts of
    the keys the diffusers/transformers classes take. A fresh deep copy on each call."""
    return copy.deepcopy(_CONFIGS[_check(arch)])


def arch_denoiser_config(arch: str) -> dict:
    """The UNet config of `arch`, e.g. for `with torch.device("meta"): UNet2DConditionModel.from_config(...)`."""
    return arch_configs(arch)["unet"]


@lru_cache(maxsize=1)
def _clip_vocab_files() -> tuple[str, str]:
    """A byte-level vocabulary the size of CLIP's (49408), written once per user: the 256 byte symbols
    (ids 0-255, in CLIP's order, so "!" is 0 as in CLIP), the same word-final (256-511), filler
    entries no text maps to (no merges: BPE only ever yields byte symbols), then CLIP's special
    tokens at their real ids."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [f"<|unused{i}|>" for i in range(len(tokens), CLIP_BOS_ID)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE
    folder = Path(tempfile.gettempdir()) / f"alignprop-clip-vocab-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}), "merges.txt": "#version: 0.2\n"}
    for name, text in files.items():
        path = folder / name
        if not path.is_file() or path.read_text() != text:  # atomic: concurrent workers read whole files
            tmp = folder / f"{name}.{os.getpid()}.tmp"
            tmp.write_text(text)
            os.replace(tmp, path)
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def build_arch_tokenizer(arch: str) -> CLIPTokenizer:
    """The offline stand-in for `arch`'s tokenizer: 49408 ids, bos 49406, eos 49407, the published pad
    token, model_max_length 77 (see the module docstring for what it does not keep)."""
    vocab_file, merges_file = _clip_vocab_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=CLIP_MAX_LENGTH,
                         pad_token=_PAD_TOKENS[_check(arch)])


def _rng_devices() -> tuple[list[int], str]:
    """The accelerator RNG that module initialisation draws from under the current default device
    (`with torch.device("cuda"):`), for fork_rng to save and restore along with the CPU's."""
    device = torch.get_default_device()
    if device.type in ("cpu", "meta"):
        return [], "cuda"
    module = getattr(torch, device.type)
    return [device.index if device.index is not None else module.current_device()], device.type


def build_arch_pipeline(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """`arch`'s full-size StableDiffusionPipeline with random weights, the published configs, the
    offline tokenizer, a DDIMScheduler from the published scheduler config, no safety checker,
    every module in eval mode. The weights are a pure function of (arch, seed, the device they are
    initialised on: the default device, e.g. under `with torch.device("cuda"):`); other dtypes are
    the fp32 weights cast, so an fp16 build is the rounding of the fp32 one. The global RNG state is
    left as it was."""
    configs = arch_configs(arch)
    tokenizer = build_arch_tokenizer(arch)
    devices, device_type = _rng_devices()
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    with torch.device("cpu"):  # scheduler tables stay on the CPU, as from_pretrained leaves them
        scheduler = DDIMScheduler.from_config(configs["scheduler"])
    for module in (unet, vae, text_encoder):
        module.eval()
    cast_modules((unet, vae, text_encoder), dtype)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
