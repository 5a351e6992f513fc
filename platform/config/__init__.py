"""Typed run configuration: dataclass schema ← YAML preset ← `key=value` overrides, validated.

    cfg = load_config("tiny-cpu", ["optim.lr=3e-4", "truncation.k=5"])

Every error is a `ConfigError` whose message is one line naming the field and what is accepted;
it is raised on the driver before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "configs"
PROMPT_DIR = Path(__file__).parent / "prompts"
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ARCH_NAMES = ("sd15", "sd21")  # model.arch (platform/models/full_size.py)
CHECKPOINT_MODES = ("all", "none", "auto")  # sampling.checkpoint_unet (trainers/sampling.py)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # perf.compile_mode
FAMILY_CHOICES = ("auto", "sd", "sdxl", "sd3")  # trainers/families.py
ALGORITHMS = ("alignprop", "ddpo", "refl", "draft_lv")  # trainer.algorithm
# Run, sweep and config names become directory names and MLflow tag values: keep them plain.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SAFE_NAME_TEXT = "letters, digits and . _ + - (at most 128, not starting with . _ + -)"
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


TOY_WORLD_MODEL = "toy-world"  # model.pretrained naming the shipped toy-world pipeline


class ConfigError(ValueError):
    """A bad config value; the message names the field and the accepted values."""


@dataclass
class ModelSection:
    pretrained: Optional[str] = None  # hub id, local diffusers directory, or toy-world (the shipped toy pipeline)
    tiny: bool = False  # build the tiny offline pipeline instead
    # sd15 | sd21: build that published full-size architecture with random weights, offline
    # (platform/models/full_size.py): real sizes for benchmarks and tests without the hub
    arch: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"  # frozen VAE / text encoder / UNet weights
    # auto: read from the pipeline (model_index.json's _class_name; sd for model.tiny) | sd (SD 1.x/2.x
    # UNet) | sdxl (SDXL UNet, two text encoders) | sd3 (flow-matching MMDiT transformer)
    family: str = "auto"
    t5: bool = True  # sd3 only: load the T5 text encoder; false = CLIP only (zeros in T5's place, as diffusers does)


@dataclass
class LoraSection:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    # lora_B = 0 either way; lora_A ~ N(0, std 1/rank) as diffusers' LoRALinearLayer (the official
    # AlignProp code) and TRL's init_lora_weights="gaussian", or peft's default kaiming-uniform,
    # whose smaller A (std ≈ 0.02–0.03 on SD1.5) adapts ~10× slower at the same lr.
    init: str = "gaussian"


@dataclass
class SamplingSection:
    num_steps: int = 50  # N DDIM steps
    guidance_scale: float = 5.0
    eta: float = 1.0
    resolution: int = 512
    # activation checkpointing of the denoiser calls in the window (trainers/sampling.py CheckpointPlan):
    # all (true) | none (false) | auto: keep the activations of as many calls as fit activation_budget_mb
    checkpoint_unet: str = "all"
    activation_budget_mb: Optional[float] = None  # auto's budget; null: half the free GPU memory (CPU: 1/4 of MemAvailable)
    checkpoint_vae: bool = False


@dataclass
class TruncationSection:
    # fixed | uniform | gaussian: contiguous last-K window (default); per_step: for reproductions of
    # the official code / TRL (a cut redrawn at every denoising step; see trainers/sampling.py)
    strategy: str = "fixed"
    k: int = 1  # fixed
    low: int = 1  # uniform bounds on K (inclusive); also the bounds on K for gaussian
    high: int = 50
    mean: float = 10.0  # gaussian on K (rounded, clipped to [low, high]) ...
    std: float = 5.0
    cut_mean: Optional[float] = None  # ... or, when set, gaussian on the cut index c, K = N − c
    cut_std: float = 5.0  # (official v2: cut_mean=42 cut_std=5 low=1 high=49 for N=50)
    cut_low: int = 0  # per_step: cut c_i ~ U{cut_low..cut_high} at every step i, detached if i < c_i
    cut_high: Optional[int] = None  # None: sampling.num_steps (official v1 / TRL: randint(0, 50), N=50)


@dataclass
class OptimSection:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    loss_scale: float = 1.0  # backward() on loss × loss_scale (official v1: 0.01 with max_grad_norm 5)


@dataclass
class TrainerSection:
    batch_size: int = 2  # per worker
    max_steps: int = 100  # optimizer steps
    seed: int = 0
    prompts: list[str] = field(default_factory=list)
    prompt_file: Optional[str] = None  # a path, or the name of a file in platform/prompts/
    eval_prompts: list[str] = field(default_factory=list)
    eval_prompt_file: Optional[str] = None  # like prompt_file; read on the driver into eval_prompts
    eval_seed: int = 1234
    eval_every: int = 10  # 0 disables evaluation
    ckpt_every: int = 10
    keep_checkpoints: int = 2
    early_stop_metric: Optional[str] = None  # e.g. eval/colorfulness: stop when it stops improving
    early_stop_patience: int = 3  # evaluations without a new best before stopping
    ema_decay: float = 0.0  # EMA of the LoRA weights (0 disables); evaluated and saved beside them
    fail_at_step: Optional[int] = None  # fault injection for tests: raise at this step unless resumed
    # alignprop (reward backprop through the last K steps) | ddpo (RL: DDPO-IS with PPO clipping) |
    # refl (reward on x̂0 from one random late step) | draft_lv (K = 1 with re-noised copies)
    algorithm: str = "alignprop"


@dataclass
class DDPOSection:
    """trainer.algorithm=ddpo. Defaults: kvablack/ddpo-pytorch config/base.py (`train.*`)."""

    inner_epochs: int = 1  # train.num_inner_epochs: passes (one update each) over a sampled batch
    clip_range: float = 1e-4  # train.clip_range: PPO's ε on the importance ratio
    adv_clip_max: float = 5.0  # train.adv_clip_max: advantages clipped to ±this
    timestep_fraction: float = 1.0  # train.timestep_fraction: share of each trajectory's steps trained on
    train_cfg: bool = True  # train.cfg: the policy's log-prob uses the guided prediction, as sampled
    per_prompt_stats: bool = True  # per_prompt_stat_tracking: advantages from each prompt's recent rewards
    stats_buffer: int = 16  # per_prompt_stat_tracking.buffer_size
    stats_min_count: int = 16  # per_prompt_stat_tracking.min_count: below it, the batch's mean and std


@dataclass
class ReFLSection:
    """trainer.algorithm=refl: stop at a random step (0-based sampling index) in [low, high], predict
    x̂0 in one step, reward on x̂0, gradient through that step only. None: low = ⌊3N/4⌋, high = N − 1
    (ImageReward's ReFL: 40 steps, stop step randint(30, 39))."""

    low: Optional[int] = None
    high: Optional[int] = None


@dataclass
class DraftLVSection:
    """trainer.algorithm=draft_lv: sample without a graph, then `copies` times re-noise x0 to the last
    step's noise level and denoise it once with a graph; the reward gradient is averaged over the
    copies (DRaFT-LV, Clark et al. 2023, n = 2)."""

    copies: int = 2


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16


@dataclass
class PerfSection:
    """Speed switches (trainers/perf.py); none changes what is trained except autocast's rounding."""

    # none | bf16 | fp16: run the denoiser, VAE and rewards under torch.autocast (frozen weights in
    # model.dtype, LoRA weights and their AdamW state fp32; use with deepspeed.precision fp32/auto)
    autocast: str = "none"
    attention: str = "sdpa"  # sdpa (torch's scaled_dot_product_attention) | eager (diffusers' AttnProcessor)
    channels_last: bool = False  # UNet and VAE in channels-last memory format (convolutions)
    tf32: bool = True  # CUDA: TF32 tensor cores for float32 matmuls and convolutions
    compile_prefix: bool = False  # torch.compile the denoiser for the no-grad steps before the window
    # torch.compile's mode for it: default | reduce-overhead (CUDA graphs: no per-kernel launch cost) | max-autotune
    compile_mode: str = "default"


@dataclass
class RaySection:
    address: Optional[str] = None  # None: RAY_ADDRESS or a local Ray
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    resource_wait_s: Optional[float] = None  # None: refuse at once on a local Ray, wait up to 600 s on a cluster
    storage_path: Optional[str] = None  # None: ~/ray_results
    max_failures: int = 0


@dataclass
class TrackingSection:
    uri: Optional[str] = None  # None: sqlite:///<cwd>/mlflow.db
    experiment: Optional[str] = None  # None: the config's name
    run_name: Optional[str] = None  # None: <config name>-<hash of what shapes the training>


@dataclass
class RunConfig:
    name: str = MISSING
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    truncation: TruncationSection = field(default_factory=TruncationSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    rewards: list[Any] = field(default_factory=lambda: [{"name": "brightness", "weight": 1.0}])
    eval_rewards: list[Any] = field(default_factory=list)
    ddpo: DDPOSection = field(default_factory=DDPOSection)
    refl: ReFLSection = field(default_factory=ReFLSection)
    draft_lv: DraftLVSection = field(default_factory=DraftLVSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    perf: PerfSection = field(default_factory=PerfSection)
    ray: RaySection = field(default_factory=RaySection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


def resolve_preset(name_or_path: str) -> Path:
    """`tiny-cpu` → platform/configs/tiny-cpu.yaml; a path (has a / or a .yaml suffix) is taken as given."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}; accepted: a preset ({', '.join(list_presets())}) or a YAML path")
        return path
    if not SAFE_NAME.fullmatch(name_or_path) or not (PRESET_DIR / f"{name_or_path}.yaml").is_file():
        raise ConfigError(f"--config: unknown preset {name_or_path!r}; accepted: {', '.join(list_presets())} or a YAML path")
    return PRESET_DIR / f"{name_or_path}.yaml"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: Sequence[str] = (), paths: bool = True) -> RunConfig:
    """Merge schema ← preset ← overrides, validate, check the paths it names (unless `paths=False`:
    a preset meant for another machine), and return a typed config."""
    preset = resolve_preset(name_or_path)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r}: expected key=value; accepted: e.g. optim.lr=3e-4 or truncation.k=5")
        if item.split("=", 1)[1].strip() == "???":
            raise ConfigError(f"{item.split('=', 1)[0].strip()}: '???' (a missing value); accepted: a value")
    try:
        data = OmegaConf.load(preset)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {preset}: not a readable YAML file ({_first_line(err)}); accepted: a mapping of sections such as model, optim, trainer") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"--config {preset}: expected a mapping of sections; accepted: {', '.join(f.name for f in fields(RunConfig))}")
    reward_edits = [item for item in overrides if _REWARD_OPTION.match(item)]
    overrides = [item for item in overrides if item not in reward_edits]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig(name=preset.stem)), data, OmegaConf.from_dotlist(list(overrides)))
        _apply_reward_edits(merged, reward_edits)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: '???' (a missing value); accepted: a value for {missing[0]}")
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. rewards={name: x}: a mapping where a list belongs
        raise ConfigError(_merge_type_message(err, overrides)) from None
    validate(cfg)
    if paths:
        check_paths(cfg)
    return cfg


# rewards.<label>.<option>=value (and eval_rewards.…): one option of one listed reward, as in sweep spaces
_REWARD_OPTION = re.compile(r"(eval_rewards|rewards)\.([^.=\[\]]+)\.(\w+)=(.*)", re.S)


def _apply_reward_edits(merged: DictConfig, edits: Sequence[str]) -> None:
    for item in edits:
        section, label, option, value = _REWARD_OPTION.match(item).groups()
        entries = [e for e in merged[section] if isinstance(e, DictConfig) and e.get("label", e.get("name")) == label]
        if not entries:
            labels = [str(e.get("label", e.get("name"))) for e in merged[section] if isinstance(e, DictConfig)]
            raise ConfigError(f"{section}.{label}: no such reward in {section}; accepted: {', '.join(labels) or 'none listed'}")
        entries[0][option] = yaml.safe_load(value) if value.strip() else None


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _merge_type_message(err: Exception, overrides: Sequence[str]) -> str:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _LIST_FIELDS and not item.split("=", 1)[1].lstrip().startswith("["):
            return f"{key}: got {item.split('=', 1)[1]!r}; accepted: {_LIST_FIELDS[key]}"
    return f"config: {_first_line(err)}"


_LIST_FIELDS = {
    "rewards": "a list such as [{name: brightness, weight: 1.0}]",
    "eval_rewards": "a list such as [{name: saturation}]",
    "lora.target_modules": "a list such as [to_q, to_k, to_v, to_out.0]",
    "optim.betas": "a list of two numbers such as [0.9, 0.999]",
    "trainer.prompts": "a list of prompts such as [a cat, a dog]",
    "trainer.eval_prompts": "a list of prompts such as [a cat, a dog]",
}


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    first = str(err).splitlines()[0]
    if "Key '" in first and "not in" in first:
        return f"{key}: unknown key; accepted: {', '.join(_section_keys(key))}"
    bad_type = re.match(r"Value '(.*)' of type '.*' could not be converted to (\w+)", first)
    if bad_type:
        return f"{key}: got {bad_type[1]!r}; accepted: a {bad_type[2].lower()}"
    if key in _LIST_FIELDS:
        return f"{key}: not a list; accepted: {_LIST_FIELDS[key]}"
    section = re.match(r"Merge error: \w+ is not a subclass of (\w+)Section", first)
    if section or "is not a subclass of" in first:
        name = key or (section[1].lower() if section else "config")
        keys = _section_keys(f"{name}.x") if name in {f.name for f in fields(RunConfig)} else []
        return f"{name}: not a mapping; accepted: a mapping of {', '.join(keys) or 'keys'}"
    if "Interpolation" in type(err).__name__ or "interpolation" in first.lower():
        return f"{key or 'config'}: cannot resolve interpolation ({first}); accepted: plain values"
    if "Incompatible value 'None'" in first:
        return f"{key}: no value given; accepted: {key}=<value>"
    return f"{key}: {first}" if key else first


def _section_keys(full_key: str) -> list[str]:
    """The keys accepted beside `full_key` (e.g. optim.bogus → lr, betas, ...)."""
    node: Any = RunConfig
    for part in full_key.split(".")[:-1]:
        node = {f.name: f for f in fields(node)}[part].default_factory
    return [f.name for f in fields(node)]


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks the schema cannot express. Raises ConfigError (one line)."""
    from alignprop.rewards import validate_reward_specs

    m, s, t, o, tr = cfg.model, cfg.sampling, cfg.truncation, cfg.optim, cfg.trainer
    _check_finite(cfg)
    _check(bool(SAFE_NAME.fullmatch(cfg.name)), "name", f"got {cfg.name!r}; accepted: {SAFE_NAME_TEXT}")
    if cfg.tracking.run_name is not None:
        _check(bool(SAFE_NAME.fullmatch(cfg.tracking.run_name)), "tracking.run_name", f"got {cfg.tracking.run_name!r}; accepted: {SAFE_NAME_TEXT}")
    _check(m.tiny + bool(m.pretrained) + (m.arch is not None) == 1, "model",
           f"set exactly one of model.pretrained (hub id or local dir), model.tiny=true or model.arch ({', '.join(ARCH_NAMES)})")
    _check(m.arch is None or m.arch in ARCH_NAMES, "model.arch", f"got {m.arch!r}; accepted: {', '.join(ARCH_NAMES)}")
    _check(m.arch is None or m.family in ("auto", "sd"), "model.family", f"got {m.family!r} with model.arch={m.arch}; accepted: auto or sd")
    _check(m.dtype in DTYPE_NAMES, "model.dtype", f"got {m.dtype!r}; accepted: {', '.join(DTYPE_NAMES)}")
    _check(m.family in FAMILY_CHOICES, "model.family", f"got {m.family!r}; accepted: {', '.join(FAMILY_CHOICES)}")
    _check(m.t5 or m.family in ("sd3", "auto"), "model.t5", f"false applies to model.family sd3 only (got family {m.family!r}); accepted: true, or model.family=sd3")
    _check(cfg.lora.rank >= 1, "lora.rank", f"got {cfg.lora.rank}; accepted: an integer >= 1")
    _check(cfg.lora.alpha > 0, "lora.alpha", f"got {cfg.lora.alpha}; accepted: > 0")
    _check(len(cfg.lora.target_modules) > 0, "lora.target_modules", "empty; accepted: module names such as to_q, to_k, to_v, to_out.0")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"got {cfg.lora.dropout}; accepted: 0 <= dropout < 1")
    _check(cfg.lora.init in ("gaussian", "kaiming"), "lora.init", f"got {cfg.lora.init!r}; accepted: gaussian, kaiming")
    _check(s.num_steps >= 1, "sampling.num_steps", f"got {s.num_steps}; accepted: an integer >= 1")
    _check(s.guidance_scale >= 1, "sampling.guidance_scale", f"got {s.guidance_scale}; accepted: >= 1 (1 disables classifier-free guidance)")
    _check(0 <= s.eta <= 1, "sampling.eta", f"got {s.eta}; accepted: 0 <= eta <= 1")
    _check(s.resolution >= 8 and s.resolution % 8 == 0, "sampling.resolution", f"got {s.resolution}; accepted: a multiple of 8, >= 8")
    s.checkpoint_unet = {"true": "all", "false": "none"}.get(str(s.checkpoint_unet).lower(), s.checkpoint_unet)
    _check(s.checkpoint_unet in CHECKPOINT_MODES, "sampling.checkpoint_unet", f"got {s.checkpoint_unet!r}; accepted: {', '.join(CHECKPOINT_MODES)} (true = all, false = none)")
    _check(s.activation_budget_mb is None or s.activation_budget_mb >= 0, "sampling.activation_budget_mb",
           f"got {s.activation_budget_mb}; accepted: megabytes >= 0, or null for half the free GPU memory")
    _validate_perf(cfg)
    _validate_truncation(t, s.num_steps)
    _check(o.lr > 0, "optim.lr", f"got {o.lr}; accepted: > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"got {list(o.betas)}; accepted: two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", f"got {o.eps}; accepted: > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"got {o.weight_decay}; accepted: >= 0")
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", f"got {o.max_grad_norm}; accepted: >= 0 (0 disables clipping)")
    _check(o.grad_accum >= 1, "optim.grad_accum", f"got {o.grad_accum}; accepted: an integer >= 1")
    _check(math.isfinite(o.loss_scale) and o.loss_scale > 0, "optim.loss_scale", f"got {o.loss_scale}; accepted: a finite number > 0")
    _check(tr.batch_size >= 1, "trainer.batch_size", f"got {tr.batch_size}; accepted: an integer >= 1")
    _check(tr.max_steps >= 1, "trainer.max_steps", f"got {tr.max_steps}; accepted: an integer >= 1")
    _check(tr.eval_every >= 0, "trainer.eval_every", f"got {tr.eval_every}; accepted: >= 0 (0 disables)")
    _check(tr.ckpt_every >= 1, "trainer.ckpt_every", f"got {tr.ckpt_every}; accepted: an integer >= 1")
    _check(tr.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"got {tr.keep_checkpoints}; accepted: an integer >= 1")
    _check(0 <= tr.ema_decay < 1, "trainer.ema_decay", f"got {tr.ema_decay}; accepted: 0 <= decay < 1 (0 disables)")
    _check(tr.early_stop_patience >= 1, "trainer.early_stop_patience", f"got {tr.early_stop_patience}; accepted: an integer >= 1")
    if tr.early_stop_metric is not None:
        evaluated = ["eval/reward_total"] + [f"eval/{s.get('label', s.get('name'))}" for s in [*cfg.rewards, *cfg.eval_rewards] if isinstance(s, dict)]
        _check(tr.early_stop_metric in evaluated and tr.eval_every > 0, "trainer.early_stop_metric", f"got {tr.early_stop_metric!r}; accepted (with trainer.eval_every > 0): {', '.join(evaluated)}")
    _check(bool(tr.prompts) != bool(tr.prompt_file), "trainer.prompts", "set exactly one of trainer.prompts (a list) or trainer.prompt_file")
    _check(all(isinstance(p, str) and p.strip() for p in [*tr.prompts, *tr.eval_prompts]), "trainer.prompts",
           "contains an empty prompt; accepted: non-empty strings")
    _check(not (tr.eval_prompts and tr.eval_prompt_file), "trainer.eval_prompts", "set at most one of trainer.eval_prompts (a list) or trainer.eval_prompt_file")
    _check(tr.eval_every == 0 or bool(tr.eval_prompts or tr.eval_prompt_file), "trainer.eval_prompts",
           "empty while trainer.eval_every > 0; accepted: a list of held-out prompts, trainer.eval_prompt_file, or trainer.eval_every=0")
    _validate_algorithm(cfg)
    validate_reward_specs(cfg.rewards, "rewards", allow_empty=False, needs_gradient=tr.algorithm != "ddpo")
    validate_reward_specs(cfg.eval_rewards, "eval_rewards", allow_empty=True)
    d = cfg.deepspeed
    _check(d.zero_stage in (0, 1, 2), "deepspeed.zero_stage", f"got {d.zero_stage}; accepted: 0, 1, 2")
    _check(d.precision in ("auto", "fp32", "bf16", "fp16"), "deepspeed.precision", f"got {d.precision!r}; accepted: auto, fp32, bf16, fp16")
    _check(d.precision in ("auto", "fp32") or cfg.ray.use_gpu, "deepspeed.precision", f"got {d.precision!r} with ray.use_gpu=false; accepted on CPU: auto, fp32")
    r = cfg.ray
    _check(r.num_workers >= 1, "ray.num_workers", f"got {r.num_workers}; accepted: an integer >= 1")
    _check(r.max_failures >= -1, "ray.max_failures", f"got {r.max_failures}; accepted: >= 0, or -1 for unlimited")
    _check(all(v >= 0 for v in r.resources_per_worker.values()), "ray.resources_per_worker", "accepted: non-negative amounts, e.g. {CPU: 1, GPU: 1}")
    _check(r.use_gpu or not r.resources_per_worker.get("GPU"), "ray.resources_per_worker",
           "asks for GPU with ray.use_gpu=false; accepted: ray.use_gpu=true with GPU, or no GPU key")
    _check(r.resource_wait_s is None or r.resource_wait_s >= 0, "ray.resource_wait_s", f"got {r.resource_wait_s}; accepted: >= 0 seconds")
    uri = cfg.tracking.uri
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if uri and "://" in uri else None
    _check(uri is None or scheme in TRACKING_SCHEMES, "tracking.uri",
           f"got {uri!r}; accepted: a URI with scheme {', '.join(TRACKING_SCHEMES)}, such as sqlite:///abs/path.db or http://127.0.0.1:5000")


def _check_finite(cfg: RunConfig) -> None:
    """inf and nan pass `> 0`-style checks and train to garbage: refuse them everywhere."""
    for key, value in flatten(to_dict(cfg)).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}: got {item}; accepted: a finite number")


def refl_bounds(cfg: RunConfig) -> tuple[int, int]:
    n = cfg.sampling.num_steps
    return (n * 3 // 4 if cfg.refl.low is None else cfg.refl.low), (n - 1 if cfg.refl.high is None else cfg.refl.high)


def _validate_algorithm(cfg: RunConfig) -> None:
    a, n = cfg.trainer.algorithm, cfg.sampling.num_steps
    _check(a in ALGORITHMS, "trainer.algorithm", f"got {a!r}; accepted: {', '.join(ALGORITHMS)}")
    d = cfg.ddpo
    _check(d.inner_epochs >= 1, "ddpo.inner_epochs", f"got {d.inner_epochs}; accepted: an integer >= 1")
    _check(d.clip_range > 0, "ddpo.clip_range", f"got {d.clip_range}; accepted: > 0")
    _check(d.adv_clip_max > 0, "ddpo.adv_clip_max", f"got {d.adv_clip_max}; accepted: > 0")
    _check(0 < d.timestep_fraction <= 1, "ddpo.timestep_fraction", f"got {d.timestep_fraction}; accepted: 0 < fraction <= 1")
    _check(d.stats_buffer >= 1 and d.stats_min_count >= 1, "ddpo.stats_buffer", f"got buffer {d.stats_buffer}, min_count {d.stats_min_count}; accepted: integers >= 1")
    if a == "ddpo":
        _check(cfg.sampling.eta > 0, "sampling.eta", "got 0 with trainer.algorithm=ddpo; accepted: 0 < eta <= 1 (DDPO's policy is the stochastic DDIM step; ddpo-pytorch: 1.0)")
    low, high = refl_bounds(cfg)
    _check(0 <= low <= high <= n - 1, "refl.low", f"got low={low}, high={high}; accepted: 0 <= low <= high <= sampling.num_steps - 1 ({n - 1})")
    _check(cfg.draft_lv.copies >= 1, "draft_lv.copies", f"got {cfg.draft_lv.copies}; accepted: an integer >= 1")


def _validate_perf(cfg: RunConfig) -> None:
    p = cfg.perf
    _check(p.autocast in ("none", "bf16", "fp16"), "perf.autocast", f"got {p.autocast!r}; accepted: none, bf16, fp16")
    _check(p.autocast == "none" or cfg.deepspeed.precision in ("auto", "fp32"), "perf.autocast",
           f"got {p.autocast} with deepspeed.precision={cfg.deepspeed.precision}; accepted: none, or deepspeed.precision auto/fp32 (autocast keeps fp32 LoRA weights)")
    _check(p.attention in ("sdpa", "eager"), "perf.attention", f"got {p.attention!r}; accepted: sdpa, eager")
    _check(p.compile_mode in COMPILE_MODES, "perf.compile_mode", f"got {p.compile_mode!r}; accepted: {', '.join(COMPILE_MODES)}")


def _validate_truncation(t: TruncationSection, n: int) -> None:
    strategies = ("fixed", "uniform", "gaussian", "per_step")
    _check(t.strategy in strategies, "truncation.strategy", f"got {t.strategy!r}; accepted: {', '.join(strategies)}")
    if t.strategy == "fixed":
        _check(1 <= t.k <= n, "truncation.k", f"got {t.k}; accepted: 1 <= k <= sampling.num_steps ({n})")
    elif t.strategy in ("uniform", "gaussian"):
        _check(1 <= t.low <= t.high <= n, "truncation.low", f"got low={t.low}, high={t.high}; accepted: 1 <= low <= high <= sampling.num_steps ({n})")
    if t.strategy == "gaussian" and t.cut_mean is None:
        _check(math.isfinite(t.mean) and 0 <= t.mean <= n, "truncation.mean", f"got {t.mean}; accepted: a finite number in [0, sampling.num_steps ({n})]")
        _check(math.isfinite(t.std) and t.std > 0, "truncation.std", f"got {t.std}; accepted: a finite number > 0")
    elif t.strategy == "gaussian":
        _check(math.isfinite(t.cut_mean) and 0 <= t.cut_mean <= n, "truncation.cut_mean", f"got {t.cut_mean}; accepted: a finite number in [0, sampling.num_steps ({n})], or null to use truncation.mean")
        _check(math.isfinite(t.cut_std) and t.cut_std > 0, "truncation.cut_std", f"got {t.cut_std}; accepted: a finite number > 0")
    if t.strategy == "per_step":
        high = n if t.cut_high is None else t.cut_high
        _check(0 <= t.cut_low <= high <= n, "truncation.cut_low", f"got cut_low={t.cut_low}, cut_high={t.cut_high}; accepted: 0 <= cut_low <= cut_high <= sampling.num_steps ({n}) (cut_high null: {n})")


def prompt_path(name: str, field_name: str = "trainer.prompt_file") -> Path:
    """A prompt file: an absolute path, a path relative to the cwd, a file shipped in
    platform/prompts/, or a public prompt set fetched once into the cache (platform/prompt_files.py)."""
    from alignprop.platform.prompt_files import REMOTE_PROMPT_SETS, fetch_prompt_set

    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if path.exists():
        return path.resolve()
    if not (PROMPT_DIR / name).is_file() and name in REMOTE_PROMPT_SETS:
        return fetch_prompt_set(name, field_name)
    return PROMPT_DIR / name


def read_prompt_file(name: str, field_name: str = "trainer.prompt_file") -> list[str]:
    """Non-empty, non-comment lines of a UTF-8 text file; ConfigError (one line) otherwise."""
    from alignprop.platform.prompt_files import REMOTE_PROMPT_SETS

    path = prompt_path(name, field_name)
    known = ", ".join(sorted([p.name for p in PROMPT_DIR.glob("*.txt")] + list(REMOTE_PROMPT_SETS)))
    _check(path.is_file(), field_name, f"no such file {name!r}; accepted: a path or one of {known}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    _check("\0" not in text, field_name, f"{str(path)!r} is not UTF-8 text; accepted: a text file, one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    _check(bool(prompts), field_name, f"{str(path)!r} has no prompts; accepted: a text file, one prompt per line (# starts a comment)")
    return prompts


def check_paths(cfg: RunConfig) -> None:
    """Checks of what the config names on this machine, done once on the driver before Ray starts:
    prompt files (public sets are fetched now), local model directory, LoRA target modules, reward
    weights, storage path. A prompt file relative to the cwd is made absolute (workers run
    elsewhere); shipped and public set names stay names (the run hash does not depend on paths)."""
    tr = cfg.trainer
    for key in ("prompt_file", "eval_prompt_file"):
        name = getattr(tr, key)
        if name:
            read_prompt_file(name, f"trainer.{key}")
            if not Path(name).expanduser().is_absolute() and Path(name).expanduser().exists():
                setattr(tr, key, str(Path(name).expanduser().resolve()))
    if cfg.model.pretrained:
        _check_pretrained(cfg.model.pretrained)
    _check_family(cfg)
    from alignprop.rewards.base import check_reward_files

    check_reward_files(cfg.rewards, "rewards")
    check_reward_files(cfg.eval_rewards, "eval_rewards")
    _check_target_modules(cfg)
    storage = cfg.ray.storage_path
    if not (storage and "://" in storage):
        _check_writable(Path(storage or "~/ray_results").expanduser().resolve(), "ray.storage_path")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_path(name: str) -> str:
    """`toy-world` → the shipped toy-world pipeline's directory (resolved where it is loaded: the
    package may sit elsewhere on each node); anything else as given."""
    if name == TOY_WORLD_MODEL:
        from alignprop.platform.toy_world import SHIPPED_DIR

        return str(SHIPPED_DIR)
    return name


def _check_pretrained(name: str) -> None:
    name = model_path(name)
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1
    if path.exists() or looks_local:
        _check(path.is_dir(), "model.pretrained", f"no such directory {name!r}; accepted: a diffusers pipeline directory or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
        _check((path / "model_index.json").is_file() and any((path / sub / "config.json").is_file() for sub in ("unet", "transformer")),
               "model.pretrained", f"{name!r} is not a diffusers pipeline directory (no model_index.json and unet/ or transformer/config.json); "
               "accepted: a directory written by save_pretrained, e.g. alignprop tiny-model DIR")
    else:
        _check(bool(_HUB_ID.fullmatch(name)), "model.pretrained", f"got {name!r}; accepted: a local pipeline directory, a hub id <org>/<name>, or {TOY_WORLD_MODEL}")


def _check_family(cfg: RunConfig) -> None:
    """model.family against the pipeline's own (when its model_index.json is readable here), and
    what the family rules out: sd3's Euler sampler has no eta, t5=false needs sd3."""
    from alignprop.platform.models import pretrained_family, resolve_family

    m = cfg.model
    found = pretrained_family(m.pretrained, m.revision) if m.pretrained else None
    _check(m.family in ("auto", found) or found is None, "model.family",
           f"got {m.family!r} but {m.pretrained!r} is a {found} pipeline; accepted: auto or {found}")
    family = resolve_family(m)
    _check(m.t5 or family in ("sd3", None), "model.t5", f"false applies to sd3 pipelines only (this one is {family}); accepted: true")
    _check(family != "sd3" or cfg.trainer.algorithm != "ddpo", "trainer.algorithm",
           "ddpo needs a stochastic DDIM sampler, and sd3's flow-matching Euler sampler is deterministic; accepted for sd3: alignprop, refl, draft_lv")
    _check(family != "sd3" or cfg.sampling.eta == 0, "sampling.eta",
           f"got {cfg.sampling.eta} for an sd3 pipeline, whose flow-matching Euler sampler is deterministic; accepted: 0")


def _check_target_modules(cfg: RunConfig) -> None:
    from alignprop.platform.models import denoiser_module_names, resolve_family

    family = resolve_family(cfg.model)
    found = denoiser_module_names(family, cfg.model.tiny, cfg.model.pretrained, cfg.model.revision, cfg.model.arch) if family else None
    if found is None:  # a hub id that is not in the local cache: the worker checks it
        return
    names, linear = found
    what = "transformer" if family == "sd3" else "UNet"
    for target in cfg.lora.target_modules:  # peft's rule for a list: the name or a dotted suffix of it
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise ConfigError(f"lora.target_modules: {target!r} matches no module of the {what}; accepted: names of its layers such as {', '.join(linear)}")


def _check_writable(path: Path, field_name: str) -> None:
    """`path` (which may not exist yet) can be created and written by this user; writes nothing."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    _check(probe.is_dir(), field_name, f"{str(probe)!r} is not a directory; accepted: a writable directory or s3://, gs:// URI")
    _check(os.access(probe, os.W_OK | os.X_OK), field_name, f"{str(probe)!r} is not writable by this user; accepted: a writable directory or s3://, gs:// URI")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain dict (what travels to Ray workers and into YAML artifacts)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict[str, Any]) -> RunConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} → {"optim.lr": 1}; reward lists by label ("rewards.brightness.weight")."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) and "name" in x for x in data):
        for item in data:
            label = item.get("label", item["name"])
            out.update(flatten({k: v for k, v in item.items() if k not in ("name", "label")}, f"{prefix}{label}."))
    else:
        out[prefix[:-1]] = data
    return out


# Keys that do not change the training trajectory: a rerun that only changes these resumes.
_NOT_IN_RUN_HASH = ("trainer.max_steps", "trainer.eval_every", "trainer.ckpt_every", "trainer.keep_checkpoints", "ray.", "tracking.")
# Fields added after runs existed: at these values they leave run names as they were, so those runs still resume.
_ADDED_DEFAULTS = {"model.arch": None, "sampling.activation_budget_mb": None, "perf.autocast": "none", "perf.attention": "sdpa", "perf.channels_last": False,
                   "perf.tf32": True, "perf.compile_prefix": False, "perf.compile_mode": "default"}


def run_name(cfg: RunConfig) -> str:
    """Deterministic: an explicit tracking.run_name, else `<name>-<8 hex of the trajectory config>`."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    shaping = {k: v for k, v in flatten(to_dict(cfg)).items()
               if not k.startswith(_NOT_IN_RUN_HASH) and (k not in _ADDED_DEFAULTS or v != _ADDED_DEFAULTS[k])}
    if shaping.get("sampling.checkpoint_unet") in ("all", "none"):  # was a bool
        shaping["sampling.checkpoint_unet"] = shaping["sampling.checkpoint_unet"] == "all"
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.name}-{digest}"
