"""Speed switches of the `perf:` config section, each benchmarked by `alignprop bench --perf`:

    alignprop bench --config tiny-cpu model.tiny=false model.arch=sd15 ray.use_gpu=true \
        perf.autocast=bf16 perf.channels_last=true perf.compile_prefix=true

* `autocast` bf16/fp16: the denoiser, VAE and rewards run under `torch.autocast`; frozen weights stay in
  `model.dtype`, the LoRA weights (and DeepSpeed's fp32 optimizer, `deepspeed.precision` fp32/auto)
  stay float32: gradients land in fp32 without a master copy, as diffusers' training scripts do.
  Sampling, rewards and evaluation run under it; DDPO's policy-gradient step runs without it.
* `attention`: sdpa (torch's fused scaled_dot_product_attention, diffusers' default) or eager
  (diffusers' `AttnProcessor`: explicit softmax(QKᵀ)V, for comparison and debugging).
* `channels_last`: UNet and VAE convolutions in NHWC, which cuDNN's tensor-core kernels prefer.
* `tf32`: float32 matmuls/convolutions on TF32 tensor cores (CUDA; what is left in fp32 under bf16).
* `lora_prefix`: fold (default) runs every denoiser call that needs no gradient (the prefix before the
  window, evaluation, DRaFT-LV's sample, ReFL's steps before its stop) with W + s·B·A folded into the
  base weights (`LoraFold`, platform/models/lora.py), restored bit for bit afterwards; wrapped runs
  peft's layers (two extra small matmuls per adapted layer and call: NOTES.md measured the SD1.5 UNet
  at 71 ms wrapped against 31 ms bare). DDPO/GRPO rollouts stay wrapped: PPO's first ratio must be 1.
* `compile_prefix`: a `torch.compile`d denoiser for the no-grad steps before the window (most of the
  N steps at small K); the steps that keep a graph use the eager module (checkpointing recomputes it).
  `compile_mode: reduce-overhead` adds CUDA graphs: at SD1.5 size and small batches the prefix is
  bound by kernel launches, not by the GPU (NOTES.md, gpu-check).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..platform.config import PerfSection

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def apply_perf(pipe, denoiser: torch.nn.Module, perf: PerfSection, device: torch.device) -> None:
    """Set the switches that change modules or global flags, once, before training starts."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = perf.tf32
        torch.backends.cudnn.allow_tf32 = perf.tf32
    if perf.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        for module in (denoiser, pipe.vae):
            if not hasattr(module, "set_attn_processor"):
                continue
            try:
                module.set_attn_processor(AttnProcessor())
            except ValueError as err:  # e.g. SD3's joint attention has no eager processor
                raise ValueError(f"perf.attention: eager is not available for {type(module).__name__} ({err}); "
                                 "accepted: sdpa") from None
    if perf.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


def autocast(perf: PerfSection, device: torch.device):
    """The context the forward passes run in: torch.autocast for bf16/fp16, else nothing."""
    if perf.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[perf.autocast])


def compute_dtype(perf: PerfSection, precision: str) -> Optional[torch.dtype]:
    """The dtype of the worker's forward math (rewards `dtype: auto` follow it); None = float32."""
    if perf.autocast != "none":
        return AUTOCAST_DTYPES[perf.autocast]
    return AUTOCAST_DTYPES.get(precision)


def compiled_prefix(denoiser: torch.nn.Module, perf: PerfSection):
    """The denoiser for the no-grad prefix: compiled when `perf.compile_prefix`, else None (eager)."""
    if not perf.compile_prefix:
        return None
    return torch.compile(denoiser, dynamic=False, mode=None if perf.compile_mode == "default" else perf.compile_mode)
