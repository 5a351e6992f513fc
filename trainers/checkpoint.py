"""The DeepSpeed engine's part of an alignprop checkpoint, in our own format: safetensors + JSON only.

A checkpoint directory holds the recipe's files (`AlignPropRecipe.save_checkpoint`: trainer_state.json,
the LoRA adapter, the EMA weights) and these, written by `save_engine_state`:

- optimizer.safetensors (rank 0): the FULL fp32 master weight and AdamW moments of every LoRA parameter,
  gathered across the ZeRO partitions: `{name}.weight_fp32`, `{name}.exp_avg`, `{name}.exp_avg_sq`
  (`{name}.max_exp_avg_sq` with amsgrad); only the master weights before the first optimizer step.
- engine_state.json (rank 0): format and version, the Adam step (null before the first step),
  DeepSpeed's counters, fp16's dynamic loss scale, and the world size and ZeRO stage it was saved with.
- rng_rank{rank}.safetensors (every rank): that rank's CPU (and CUDA) RNG state, as uint8 tensors.

Why not DeepSpeed's `engine.save_checkpoint`: it writes pickles (torch.save), and unpickling can run
arbitrary code, so resuming from a checkpoint directory someone else could write would run their code.
We load only safetensors and JSON, and `check_checkpoint_files` refuses a directory holding any other
file before anything is read. Because the tensors are full (not one rank's partition), a checkpoint
loads at any world size and ZeRO stage 0–2, whatever it was saved with.

Where the master weights and AdamW state live depends on the optimizer DeepSpeed wraps our torch AdamW in:

- ZeRO 1/2 (and BF16_Optimizer): a flat fp32 partition per param group and rank; the LoRA param has
  `_hp_mapping` to its fragment, and the base torch AdamW's state is keyed by the partition
  (`engine.optimizer.optimizer.state[flat]`). deepspeed.utils.safe_get_full_* all-reduce (collective).
- ZeRO 0 with bf16/fp16 (FP16_Optimizer, GPU only): one flat fp32 master per group, not partitioned,
  state in `engine.optimizer.optimizer.state[flat]`; we slice it ourselves (`_flat_masters`).
- ZeRO 0 in fp32: `engine.optimizer` IS the client torch AdamW; its state is keyed by the param.

Cheap to import (the driver checks checkpoints with `check_checkpoint_files` before starting Ray):
DeepSpeed is imported inside the functions that need it. `save_engine_state` is collective: call it
on every rank at the same step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..platform.errors import UnsafeCheckpointError  # one class: the CLI prints it as one line

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

ENGINE_STATE_FILE = "engine_state.json"  # Adam step, DeepSpeed's counters, the saving world size/stage
OPTIMIZER_FILE = "optimizer.safetensors"  # full (unpartitioned) fp32 LoRA master weights + AdamW moments
RNG_FILE = "rng_rank{rank}.safetensors"
CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION = "alignprop", 1
ACCEPTED_SUFFIXES = (".safetensors", ".json")
# What DeepSpeed's engine.save_checkpoint (alignprop before the safetensors format) left in a checkpoint.
_OLD_FORMAT_NAMES = ("latest", "zero_to_fp32.py", "zero_to_torch.py")
_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

NamedParams = Sequence[tuple[str, torch.Tensor]]  # the LoRA parameters, as (name, param), same order on every rank

__all__ = ["ENGINE_STATE_FILE", "OPTIMIZER_FILE", "RNG_FILE", "UnsafeCheckpointError", "base_optimizer",
           "check_checkpoint_files", "load_engine_state", "save_engine_state"]


def check_checkpoint_files(directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory holding any file (at any depth) that is not .safetensors or
    .json: we load nothing else, and a pickle (.pt, .pkl, .bin, ...) can run code when unpickled.
    Needs no engine, model or GPU: the driver checks checkpoints with it before starting Ray."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    offending = sorted(
        (Path(parent) / name).relative_to(root).as_posix()
        for parent, _, names in os.walk(root) for name in names if not name.endswith(ACCEPTED_SUFFIXES)
    )
    if not offending:
        return
    shown = ", ".join(offending[:6]) + (f" and {len(offending) - 6} more" if len(offending) > 6 else "")
    old = any(f.startswith("engine/") or f.endswith(".pt") or f in _OLD_FORMAT_NAMES for f in offending)
    why, fix = (
        ("was written by an older alignprop with pickle files (DeepSpeed engine/*.pt, rng_rank*.pt), and "
         "alignprop does not load pickles (they can run code when loaded)", "restart the run under a new "
                                                                            "tracking.run_name")
        if old else
        ("holds files alignprop does not load (a pickle can run code when loaded)",
         "remove them, or restart the run under a new tracking.run_name"))
    raise UnsafeCheckpointError(f"checkpoint {root} {why}: {shown}; accepted are only .safetensors and .json files: "
                                f"{fix}")


# ------------------------------------------------------------------------------ save / load
def save_engine_state(engine: DeepSpeedEngine, named_params: NamedParams, directory: str | os.PathLike,
                      rank: int, world_size: int, device: torch.device) -> None:
    """Every rank, at the same step (the ZeRO gathers are collective), into an existing directory:
    rank 0 writes optimizer.safetensors and engine_state.json, every rank its own RNG state."""
    path = Path(directory)
    tensors, adam_step = _gather_optimizer_state(engine, named_params, rank, world_size, device)
    save_file(_rng_state(device), str(path / RNG_FILE.format(rank=rank)))
    if rank != 0:
        return
    save_file(tensors, str(path / OPTIMIZER_FILE), metadata={"format": CHECKPOINT_FORMAT})
    state = {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, "adam_step": adam_step,
        **{counter: int(getattr(engine, counter)) for counter in _ENGINE_COUNTERS},
        "world_size": world_size, "zero_stage": int(engine.zero_optimization_stage()),
        "loss_scaler": _loss_scaler_state(engine.optimizer),
    }
    (path / ENGINE_STATE_FILE).write_text(json.dumps(state))


def load_engine_state(engine: DeepSpeedEngine, named_params: NamedParams, directory: str | os.PathLike,
                      rank: int, device: torch.device) -> None:
    """Every rank: refuse anything but .safetensors/.json, then set this rank's share of the master
    weights and AdamW state from the full tensors, DeepSpeed's counters and loss scale, and this
    rank's RNG state (if the saving run had this rank)."""
    check_checkpoint_files(directory)
    path = Path(directory)
    state = _read_engine_state(path)
    _restore_optimizer_state(engine, named_params, load_file(str(path / OPTIMIZER_FILE)), state.get("adam_step"), path)
    for counter in _ENGINE_COUNTERS:
        setattr(engine, counter, int(state[counter]))
    _restore_loss_scaler(engine.optimizer, state.get("loss_scaler") or {})
    rng = path / RNG_FILE.format(rank=rank)
    if rng.exists():  # absent for ranks beyond the saving run's world size
        _set_rng_state(load_file(str(rng)), device)


def _read_engine_state(path: Path) -> dict:
    if not (path / ENGINE_STATE_FILE).exists():
        raise ValueError(f"checkpoint {path} has no {ENGINE_STATE_FILE}: not written by alignprop's save_checkpoint")
    state = json.loads((path / ENGINE_STATE_FILE).read_text())
    if state.get("format") != CHECKPOINT_FORMAT or int(state.get("format_version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: format {state.get('format')!r} version "
                         f"{state.get('format_version')!r}; this alignprop reads {CHECKPOINT_FORMAT!r} "
                         f"up to version {CHECKPOINT_FORMAT_VERSION}")
    return state


# ------------------------------------------------------------- where DeepSpeed keeps the state
def base_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch AdamW holding the state: wrapped by ZeRO/FP16_Optimizer, or the engine's own (ZeRO 0, fp32)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _adam_keys(base: torch.optim.Optimizer) -> tuple[str, ...]:
    amsgrad = any(g.get("amsgrad") for g in base.param_groups)
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


def _flat_masters(engine: DeepSpeedEngine) -> dict[int, tuple[torch.Tensor, int]]:
    """FP16_Optimizer (ZeRO 0, bf16/fp16): id(param) -> (its group's flat fp32 master, offset)."""
    opt = engine.optimizer
    groups, flats = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups_flat", None)
    if groups is None or flats is None:
        return {}
    out = {}
    for params, flat in zip(groups, flats):
        offset = 0
        for p in params:
            out[id(p)] = (flat, offset)
            offset += p.numel()
    return out


def _local_master(base: torch.optim.Optimizer, p: torch.Tensor, key: Optional[str], flats: dict) -> torch.Tensor:
    """The unpartitioned master weight (key None) or AdamW state tensor of `p`, as a view."""
    if id(p) in flats:
        flat, offset = flats[id(p)]
        source = flat if key is None else base.state[flat][key]
        return source.narrow(0, offset, p.numel()).view_as(p)
    return p.data if key is None else base.state[p][key]


def _adam_state_exists(base: torch.optim.Optimizer, world_size: int, device: torch.device) -> bool:
    """AdamW creates its state on the first step; agreed across ranks (the gathers are collective)."""
    exists = all(base.state.get(q) for group in base.param_groups for q in group["params"])
    if world_size > 1 and dist.is_initialized():
        flag = torch.tensor([int(exists)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        exists = bool(flag.item())
    return exists


# ------------------------------------------------------------------- gather / restore the state
@torch.no_grad()
def _gather_optimizer_state(engine: DeepSpeedEngine, named_params: NamedParams, rank: int, world_size: int,
                            device: torch.device) -> tuple[dict[str, torch.Tensor], Optional[int]]:
    """Every rank, same order: {name.weight_fp32, name.exp_avg, name.exp_avg_sq} (full fp32
    tensors, CPU on rank 0) and the Adam step (None before the first optimizer step)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = base_optimizer(engine)
    has_state, keys, flats = _adam_state_exists(base, world_size, device), _adam_keys(base), _flat_masters(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        full = {"weight_fp32": safe_get_full_fp32_param(p)}
        for key in keys if has_state else ():
            full[key] = safe_get_full_optimizer_state(p, key)
        for key, value in full.items():
            if value is None:  # not partitioned by ZeRO: the tensor is whole on every rank
                value = _local_master(base, p, None if key == "weight_fp32" else key, flats)
            if rank == 0:
                tensors[f"{name}.{key}"] = value.detach().float().cpu().contiguous().clone()
    return tensors, (_adam_step(base) if has_state else None)


@torch.no_grad()
def _restore_optimizer_state(engine: DeepSpeedEngine, named_params: NamedParams, tensors: dict[str, torch.Tensor],
                             adam_step: Optional[int], path: Path) -> None:
    """Set every LoRA param's master weight (and, from the first step on, its AdamW state and step)."""
    base = base_optimizer(engine)
    keys = _adam_keys(base) if adam_step is not None else ()
    _check_tensor_names(tensors, named_params, keys, path)
    if keys:
        _ensure_adam_state(engine, base)
    flats = _flat_masters(engine)
    for name, p in named_params:
        for key in ("weight_fp32", *keys):
            value = tensors[f"{name}.{key}"]
            if value.shape != p.shape:
                raise ValueError(f"checkpoint {path / OPTIMIZER_FILE}: {name}.{key} has shape "
                                 f"{tuple(value.shape)}, this run's parameter {tuple(p.shape)}")
            _set_full_tensor(base, p, None if key == "weight_fp32" else key, value, flats)
    if keys:
        _set_adam_step(base, adam_step)


def _adam_step(base: torch.optim.Optimizer) -> int:
    step = base.state[base.param_groups[0]["params"][0]]["step"]
    return int(step.item() if torch.is_tensor(step) else step)


def _set_adam_step(base: torch.optim.Optimizer, adam_step: int) -> None:
    for group in base.param_groups:
        for q in group["params"]:
            step = base.state[q]["step"]
            if torch.is_tensor(step):
                step.fill_(adam_step)
            else:
                base.state[q]["step"] = adam_step


def _check_tensor_names(tensors: dict[str, torch.Tensor], named_params: NamedParams, keys: tuple[str, ...],
                        path: Path) -> None:
    wanted = {f"{n}.{k}" for n, _ in named_params for k in ("weight_fp32", *keys)}
    missing, extra = sorted(wanted - tensors.keys()), sorted(tensors.keys() - wanted)
    if missing or extra:
        raise ValueError(f"checkpoint {path / OPTIMIZER_FILE} does not match this run's LoRA parameters "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}): was it saved with another lora "
                         "config?")


def _set_full_tensor(base: torch.optim.Optimizer, p: torch.Tensor, key: Optional[str], value: torch.Tensor,
                     flats: dict) -> None:
    """Set `p`'s master weight (key None) or AdamW state `key` from its full tensor `value`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):  # ZeRO: sets this rank's fragment (if it owns one)
        if key is None:
            safe_set_full_fp32_param(p, value.to(p.device))
        else:
            safe_set_full_optimizer_state(p, value.to(p.device), key)
    else:
        _local_master(base, p, key, flats).copy_(value)
    if key is None:
        p.data.copy_(value)  # the module's (low-precision) copy the forward pass uses


@torch.no_grad()
def _ensure_adam_state(engine: DeepSpeedEngine, base: torch.optim.Optimizer) -> None:
    """A fresh engine has no AdamW state until its first step: create it (zeros) as AdamW
    would, and let ZeRO link its param fragments to it (DeepSpeed does that after a step)."""
    created = False
    for group in base.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for q in group["params"]:
            if base.state.get(q):
                continue
            base.state[q] = {"step": torch.zeros((), dtype=torch.float32, device=q.device if on_device else "cpu")}
            for key in _adam_keys(base):
                base.state[q][key] = torch.zeros_like(q, memory_format=torch.preserve_format)
            created = True
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if created and link is not None:
        link()


# ---------------------------------------------------------------------- RNG and loss scale
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}  # uint8 tensors: safetensors, not pickle
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _dynamic_loss_scaler(optimizer):
    scaler = getattr(optimizer, "loss_scaler", None)
    return scaler if getattr(scaler, "dynamic", False) else None


def _loss_scaler_state(optimizer) -> dict:
    """fp16's dynamic loss scale (numbers only); empty for fp32/bf16 (a static scale of 1)."""
    scaler = _dynamic_loss_scaler(optimizer)
    values = {f: getattr(scaler, f, None) for f in _LOSS_SCALER_FIELDS}
    return {f: v for f, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _restore_loss_scaler(optimizer, state: dict) -> None:
    """Only into a dynamic scaler (fp16 → fp16): a static one keeps its configured scale."""
    scaler = _dynamic_loss_scaler(optimizer)
    for field_name, value in state.items() if scaler is not None else ():
        if field_name in _LOSS_SCALER_FIELDS and hasattr(scaler, field_name):
            setattr(scaler, field_name, value)
