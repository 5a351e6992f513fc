"""`alignprop soup`: mix trained LoRA adapters into one diffusers-loadable adapter.

    alignprop soup --lora runs/aesthetic --lora runs/hps --weights 0.7 0.3 --out soups/mix
    alignprop soup --lora a.safetensors --lora b.safetensors --weights 0.5 0.5 --mode params --out soups/avg

`--mode delta` (default) is exact: the mixed update is sum_i w_i · (alpha_i / r_i) · B_i A_i, built
by stacking the adapters along the rank (rank = sum of ranks). `--mode params` interpolates the
A and B matrices themselves (the AlignProp paper's weight interpolation; needs identical shapes
and scales) and keeps the rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignprop.platform.config import ConfigError
from alignprop.platform.models import LORA_WEIGHTS_NAME

METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps rank/alpha/targets
LORA_ACCEPTED = (f"a directory holding {LORA_WEIGHTS_NAME}, or that file (safetensors format; "
                 "pickled .bin/.pt/.ckpt files are never loaded)")


def lora_weights_file(path: str | Path, source: Optional[str] = None) -> Path:
    """The adapter's .safetensors file in a LoRA directory (or the file itself), checked to be a
    readable safetensors file by its header alone (nothing is unpickled or loaded). One-line
    FileNotFoundError / ConfigError naming the file; `source` is what the user gave (e.g. a URI)."""
    path = Path(path)
    origin = f" (from {source})" if source and source != str(path) else ""
    file = path / LORA_WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--lora: no {LORA_WEIGHTS_NAME} in {path}{origin}; accepted: {LORA_ACCEPTED}")
    if file.suffix != ".safetensors":
        raise ConfigError(f"--lora: {file}{origin} is not a .safetensors file; accepted: {LORA_ACCEPTED}")
    try:
        with safe_open(str(file), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # SafetensorError, OSError, ...: not a safetensors file
        reason = " ".join(str(err).split())[:120]
        raise ConfigError(f"--lora: {file}{origin} is not in safetensors format ({reason}); accepted: {LORA_ACCEPTED}") from None
    return file


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter metadata) of a LoRA directory or .safetensors file."""
    file = lora_weights_file(path)
    with safe_open(str(file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not _pairs(state):
        raise ConfigError(f"--lora: {file} holds no LoRA weights (no lora_A/lora_B or lora.down/lora.up tensors); accepted: {LORA_ACCEPTED}")
    try:
        meta = json.loads(raw) if raw else {}  # diffusers prefixes each key with the component: "unet.r"
    except json.JSONDecodeError:
        raise ConfigError(f"--lora: {file} has unreadable {METADATA_KEY} metadata; accepted: an adapter saved by alignprop or diffusers") from None
    return state, {k.removeprefix("unet."): v for k, v in meta.items()}


def _pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """module prefix → (down/A key, up/B key)."""
    pairs = {}
    for key in state:
        for down, up in ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")):
            if key.endswith(down):
                prefix = key[: -len(down)]
                pairs[prefix] = (key, prefix + up)
    return pairs


def _scale(meta: dict, rank: int, prefix: str) -> float:
    """alpha / r for one module (diffusers metadata: r, lora_alpha, rank_pattern, alpha_pattern)."""
    r = meta.get("r", rank)
    alpha = meta.get("lora_alpha", r)
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if prefix.endswith(pattern):
            alpha = value
    return float(alpha) / float(rank)


def mix_delta(adapters: Sequence[tuple[dict, dict]], weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """Exact mix of the low-rank updates, stacked along the rank; scale folded into B (alpha = rank)."""
    modules = [_pairs(state) for state, _ in adapters]
    if any(m.keys() != modules[0].keys() for m in modules):
        raise ConfigError("--lora: the adapters target different modules; accepted: adapters of the same base model and lora.target_modules")
    out = {}
    for prefix, (down_key, up_key) in modules[0].items():
        downs, ups = [], []
        for (state, meta), weight in zip(adapters, weights):
            down, up = state[down_key].float(), state[up_key].float()
            downs.append(down)
            ups.append(up * weight * _scale(meta, down.shape[0], prefix))
        out[down_key], out[up_key] = torch.cat(downs, 0).contiguous(), torch.cat(ups, 1).contiguous()
    rank = out[next(iter(modules[0].values()))[0]].shape[0]
    meta = {**adapters[0][1], "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}
    return out, meta


def mix_params(adapters: Sequence[tuple[dict, dict]], weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """Weighted average of the A and B matrices themselves (same shapes and alpha/r required)."""
    first_state, first_meta = adapters[0]
    for state, meta in adapters[1:]:
        if state.keys() != first_state.keys() or any(state[k].shape != first_state[k].shape for k in state):
            raise ConfigError("--mode params: adapters differ in modules or ranks; accepted: --mode delta for these adapters")
        if meta.get("lora_alpha") != first_meta.get("lora_alpha"):
            raise ConfigError("--mode params: adapters have different lora_alpha; accepted: --mode delta for these adapters")
    out = {k: sum(w * s[k].float() for (s, _), w in zip(adapters, weights)).contiguous() for k in first_state}
    return out, dict(first_meta)


def check_soup_args(n_loras: int, weights: Sequence[float], mode: str = "delta") -> None:
    """One-line ConfigError for bad counts, non-finite weights or an unknown mode (before any I/O)."""
    if n_loras < 2 or n_loras != len(weights):
        raise ConfigError(f"--weights: got {len(weights)} weights for {n_loras} adapters; accepted: one weight per --lora, at least two adapters")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"--weights: got {', '.join(str(w) for w in bad)}; accepted: finite numbers, one per --lora (e.g. 0.7 0.3)")
    if mode not in ("delta", "params"):
        raise ConfigError(f"--mode: got {mode!r}; accepted: delta, params")


def soup(loras: Sequence[str], weights: Sequence[float], out_dir: str, mode: str = "delta") -> Path:
    check_soup_args(len(loras), weights, mode)
    adapters = [read_lora(path) for path in loras]
    state, meta = (mix_delta if mode == "delta" else mix_params)(adapters, weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if meta:
        metadata[METADATA_KEY] = json.dumps({f"unet.{k}": v for k, v in meta.items()}, default=list)
    save_file(state, str(out / LORA_WEIGHTS_NAME), metadata=metadata)
    return out / LORA_WEIGHTS_NAME
