"""`alignprop soup`: mix trained LoRA adapters into one diffusers-loadable adapter.

    alignprop soup --lora runs/aesthetic --lora runs/hps --weights 0.7 0.3 --out soups/mix
    alignprop soup --lora a.safetensors --lora b.safetensors --weights 0.5 0.5 --mode params --out soups/avg
    alignprop soup --lora runs/aesthetic --lora base --weights 0.5 0.5 --mode params --out soups/half
    alignprop soup --sweep 0:1:0.1 --lora runs/aesthetic --lora runs/hps --config tiny-cpu \
        --tracking-uri sqlite:////abs/mlflow.db --out soups/sweep      # see alignprop.platform.soup.alpha_scan

Two modes:

`--mode params` is the AlignProp paper's reward mixing ("mixing" section): the parameters of two
adapters trained on different rewards are interpolated, θ_mix = α θ_1 + (1 − α) θ_2, on the LoRA
parameters themselves, i.e. A_mix = α A_1 + (1 − α) A_2 and B_mix = α B_1 + (1 − α) B_2, module by
module (general form: sum_i w_i θ_i). It needs identical shapes (ranks, modules) and scales
(lora_alpha) and keeps the rank. Because the update B A is bilinear in (A, B), the mixed update is
NOT the weighted sum of the two updates: it is α² B_1A_1 + (1−α)² B_2A_2 + α(1−α)(B_1A_2 + B_2A_1).

`--mode delta` (default) is exact: the mixed update is sum_i w_i · (alpha_i / r_i) · B_i A_i, built
by stacking the adapters along the rank (rank = sum of ranks; any ranks and scales).

`base` as an adapter (`--lora base`) is the zero adapter, i.e. the base model itself, so that α
moves between the base model and one trained adapter:
  * params mode: every tensor of the other side, zeroed (A = 0 and B = 0, same keys, shapes and
    lora_alpha). Interpolating with zeros scales BOTH matrices, A_mix = α A and B_mix = α B, so the
    update is α² · B A, not α · B A; this is what parameter interpolation (the paper's code) does.
  * delta mode: B = 0, so its update B A is exactly zero; it adds nothing to the stack and is left
    out (the mix is w · (alpha / r) · B A of the trained side: linear in w, same rank).
A directory literally named `base` is reached as `./base`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ConfigError
from ..models import LORA_WEIGHTS_NAME

METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps rank/alpha/targets
LORA_ACCEPTED = (f"a directory holding {LORA_WEIGHTS_NAME}, or that file (safetensors format; "
                 "pickled .bin/.pt/.ckpt files are never loaded)")
BASE = "base"  # `--lora base`: the zero adapter (the base model), see the module docstring
MODES = ("delta", "params")


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
        raise ConfigError(f"--lora: {file}{origin} is not in safetensors format ({reason}); "
                          f"accepted: {LORA_ACCEPTED}") from None
    return file


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter metadata) of a LoRA directory or .safetensors file."""
    file = lora_weights_file(path)
    with safe_open(str(file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if not _pairs(state):
        raise ConfigError(f"--lora: {file} holds no LoRA weights (no lora_A/lora_B or lora.down/lora.up tensors); "
                          f"accepted: {LORA_ACCEPTED}")
    try:
        # diffusers prefixes each key with the component: "unet.r", "transformer.r"
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise ConfigError(f"--lora: {file} has unreadable {METADATA_KEY} metadata; accepted: an adapter saved by "
                          "alignprop or diffusers") from None
    meta = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in meta.items()}
    _check_ranks(file, state, meta)
    return state, meta


def _check_ranks(file: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Each pair is A (r × in) and B (out × r) of one rank, and the metadata's rank (r, rank_pattern)
    is that rank: an adapter whose metadata lies would be rescaled by alpha / r silently."""
    for prefix, (down_key, up_key) in _pairs(state).items():
        down, up = state[down_key], state.get(up_key)
        if up is None or down.ndim < 2 or up.ndim < 2 or down.shape[0] != up.shape[1]:
            shapes = f"{tuple(down.shape)} and {None if up is None else tuple(up.shape)}"
            raise ConfigError(f"--lora: {file}: {prefix} has LoRA matrices of shapes {shapes}, not A (r × in) and "
                              f"B (out × r); accepted: {LORA_ACCEPTED}")
        declared = next((v for pattern, v in (meta.get("rank_pattern") or {}).items() if prefix.endswith(pattern)),
                        meta.get("r", down.shape[0]))
        if declared != down.shape[0]:
            raise ConfigError(f"--lora: {file}: its metadata says rank {declared} but {prefix} has rank "
                              f"{down.shape[0]}; accepted: an adapter whose metadata matches its tensors")


def check_fits(path: str | Path, denoiser: torch.nn.Module) -> None:
    """The adapter's modules exist in `denoiser` with its shapes: A's input and B's output sizes are the
    base layer's (a LoRA of another base model is refused in one line, before diffusers loads it)."""
    file = lora_weights_file(path)
    state, _ = read_lora(file)
    modules = dict(denoiser.named_modules())
    for prefix, (down_key, up_key) in _pairs(state).items():
        name = prefix.removeprefix("unet.").removeprefix("transformer.")
        module = modules.get(name) or modules.get(name.removesuffix(".lora"))
        base_in = getattr(module, "in_features", None)
        base_out = getattr(module, "out_features", None)
        if module is None or base_in is None:
            raise ConfigError(f"--lora: {file}: {name} is no linear layer of this base model's "
                              f"{type(denoiser).__name__}; accepted: an adapter trained on this base model")
        got = (state[down_key].shape[1], state[up_key].shape[0])
        if got != (base_in, base_out):
            raise ConfigError(f"--lora: {file}: {name} maps {got[0]} → {got[1]} features, the base model's layer "
                              f"{base_in} → {base_out}; accepted: an adapter trained on this base model")


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
        raise ConfigError("--lora: the adapters target different modules; accepted: adapters of the same base model "
                          "and lora.target_modules")
    for prefix, (down_key, up_key) in modules[0].items():
        sizes = {(state[down_key].shape[1], state[up_key].shape[0]) for state, _ in adapters}
        if len(sizes) > 1:
            raise ConfigError(f"--lora: the adapters' {prefix} have different shapes (in → out {sorted(sizes)}); "
                              "accepted: adapters of the same base model")
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
    """The paper's mixing: sum_i w_i θ_i on the A and B matrices themselves (θ_mix = α θ_1 + (1 − α) θ_2
    for two adapters); same shapes and alpha/r required."""
    first_state, first_meta = adapters[0]
    for state, meta in adapters[1:]:
        if state.keys() != first_state.keys() or any(state[k].shape != first_state[k].shape for k in state):
            raise ConfigError("--mode params: adapters differ in modules or ranks; accepted: --mode delta for these "
                              "adapters")
        if meta.get("lora_alpha") != first_meta.get("lora_alpha"):
            raise ConfigError("--mode params: adapters have different lora_alpha; accepted: --mode delta for these "
                              "adapters")
    out = {k: sum(w * s[k].float() for (s, _), w in zip(adapters, weights)).contiguous() for k in first_state}
    return out, dict(first_meta)


def check_soup_args(n_loras: int, weights: Sequence[float], mode: str = "delta",
                    loras: Optional[Sequence[str]] = None) -> None:
    """One-line ConfigError for bad counts, non-finite weights, an unknown mode or only `base`
    adapters (before any I/O)."""
    if n_loras < 2 or n_loras != len(weights):
        raise ConfigError(f"--weights: got {len(weights)} weights for {n_loras} adapters; accepted: one weight per "
                          "--lora, at least two adapters")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"--weights: got {', '.join(str(w) for w in bad)}; accepted: finite numbers, one per "
                          "--lora (e.g. 0.7 0.3)")
    if mode not in MODES:
        raise ConfigError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
    if loras is not None and all(is_base(x) for x in loras):
        raise ConfigError(f"--lora: every adapter is {BASE!r}; accepted: at least one trained adapter beside "
                          f"{BASE!r} (the zero adapter)")


def is_base(lora: str | Path | None) -> bool:
    """`base` (exactly: a directory named base is ./base) is the zero adapter."""
    return isinstance(lora, str) and lora == BASE


def zero_adapter(like: tuple[dict[str, torch.Tensor], dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """The base model as an adapter: every tensor of `like` zeroed (A = 0, B = 0), same metadata."""
    state, meta = like
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}, dict(meta)


def read_adapters(loras: Sequence[str | Path]) -> list[Optional[tuple[dict, dict]]]:
    """Each adapter's (state, metadata); None for `base` (see `mix`)."""
    return [None if is_base(x) else read_lora(x) for x in loras]


def mix(adapters: Sequence[Optional[tuple[dict, dict]]], weights: Sequence[float],
        mode: str) -> tuple[dict[str, torch.Tensor], dict]:
    """sum_i w_i θ_i in `mode`; a None adapter is `base`: zeros shaped like the first trained one
    in params mode, left out in delta mode (its update B A = 0 · A is exactly zero)."""
    trained = [a for a in adapters if a is not None]
    if not trained:
        raise ConfigError(f"--lora: every adapter is {BASE!r}; accepted: at least one trained adapter beside "
                          f"{BASE!r} (the zero adapter)")
    if mode == "delta":
        kept = [(a, w) for a, w in zip(adapters, weights) if a is not None]
        return mix_delta([a for a, _ in kept], [w for _, w in kept])
    return mix_params([a if a is not None else zero_adapter(trained[0]) for a in adapters], weights)


def write_lora(state: dict[str, torch.Tensor], meta: dict, out_dir: str | Path) -> Path:
    """Save a mixed adapter as `<out_dir>/pytorch_lora_weights.safetensors` (rank/alpha in metadata)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if meta:  # keyed by the adapter's component, as diffusers' save_lora_weights: unet (sd, sdxl) or transformer (sd3)
        component = "transformer" if any(k.startswith("transformer.") for k in state) else "unet"
        metadata[METADATA_KEY] = json.dumps({f"{component}.{k}": v for k, v in meta.items()}, default=list)
    save_file(state, str(out / LORA_WEIGHTS_NAME), metadata=metadata)
    return out / LORA_WEIGHTS_NAME


def soup(loras: Sequence[str], weights: Sequence[float], out_dir: str, mode: str = "delta") -> Path:
    """Mix `loras` (paths, or `base`) with `weights` in `mode` and save the adapter under `out_dir`."""
    check_soup_args(len(loras), weights, mode, loras)
    state, meta = mix(read_adapters(loras), weights, mode)
    return write_lora(state, meta, out_dir)
