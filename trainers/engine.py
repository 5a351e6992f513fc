"""The DeepSpeed side of a recipe: the engine over the LoRA parameters, precision, the one-rank world
for runs outside a launcher, and gathering rows from every rank.

    single_process_world(device)                              # bench, gpu-check, tests: rank 0 of 1
    engine, optimizer = build_engine(denoiser, lora_params, cfg, device, backward_calls=1)
    rows = gather_rows(per_image_rows, world_size, device)   # every rank's rows, rank order

The optimizer is a client `torch.optim.AdamW` (no fused_adam JIT build); DeepSpeed does gradient
clipping, accumulation and ZeRO 0–2. With `perf.autocast` the LoRA weights and their optimizer stay
fp32 and DeepSpeed's own mixed precision is off.
"""

from __future__ import annotations

import os
import resource
import socket

import torch
import torch.distributed as dist

from ..platform.config import RunConfig


def single_process_world(device: torch.device) -> None:
    """A one-rank torch.distributed world, as a launcher would set it up, for DeepSpeed outside Ray
    (bench, gpu-check, tests): NCCL on CUDA, gloo on CPU; nothing if a world exists already."""
    import deepspeed

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`deepspeed.precision: auto` → bf16 on a GPU that has it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: RunConfig, device: torch.device, backward_calls: int = 1, updates: int = 1) -> dict:
    """DeepSpeed's config dict; `backward_calls`: backward() calls per micro-batch (DDPO: one per trained
    timestep), so that one optimizer step spans `optim.grad_accum` micro-batches of them, or a share of
    them: `updates` optimizer steps per sampled batch (DDPO's and GRPO's updates_per_epoch)."""
    # perf.autocast keeps the LoRA weights and their optimizer fp32: DeepSpeed's own precision stays off
    precision = "fp32" if cfg.perf.autocast != "none" else resolve_precision(cfg.deepspeed.precision, device)
    return {
        "train_micro_batch_size_per_gpu": cfg.trainer.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum // updates * backward_calls,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "auto_cast": False},
        "zero_allow_untested_optimizer": True,  # our client torch AdamW: no fused_adam JIT build
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(denoiser: torch.nn.Module, lora_params: list, cfg: RunConfig, device: torch.device,
                 backward_calls: int = 1, updates: int = 1):
    """(DeepSpeed engine wrapping `denoiser`, its optimizer): AdamW over the LoRA parameters only."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(lora_params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=denoiser, optimizer=optimizer, config=deepspeed_config(cfg, device, backward_calls, updates))
    return engine, optimizer


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gather_rows(rows: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (the same shape on every rank), in rank order, on the CPU."""
    if world_size == 1 or not dist.is_initialized():
        return rows
    rows = rows.to(device)  # NCCL gathers device tensors only
    gathered = [torch.empty_like(rows) for _ in range(world_size)]
    dist.all_gather(gathered, rows)
    return torch.cat(gathered).cpu()


def broadcast_flag(flag: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's verdict on every rank."""
    if world_size == 1 or not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
