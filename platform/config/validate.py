"""Cross-field checks the schema cannot express, on values alone (no files, no models loaded):
`validate(cfg)` raises a one-line `ConfigError` naming the field and what is accepted.
"""

from __future__ import annotations

import math

from ...rewards import validate_reward_specs
from ..errors import ConfigError
from ..errors import require as _check
from ..models.full_size import ARCH_NAMES
from .schema import (ALGORITHMS, CHECKPOINT_MODES, COMPILE_MODES, DTYPE_NAMES, FAMILY_CHOICES, SAFE_NAME,
                     SAFE_NAME_TEXT, TRACKING_SCHEMES, RunConfig, TruncationSection, flatten, to_dict)


# Upper bounds (and a few lower ones) that keep a run from allocating or computing garbage: a value
# outside is a one-line error before anything starts. (key: (lowest, highest), both accepted)
BOUNDS = {
    "optim.lr": (0, 1.0), "optim.eps": (0, 1.0), "optim.weight_decay": (0, 10.0), "optim.max_grad_norm": (0, 1e6),
    "optim.loss_scale": (1e-8, 1e8), "optim.grad_accum": (1, 1024),
    "sampling.num_steps": (1, 1000), "sampling.resolution": (8, 4096), "sampling.guidance_scale": (1, 100.0),
    "trainer.batch_size": (1, 1024), "trainer.max_steps": (1, 10_000_000), "trainer.seed": (0, 2**31 - 1),
    "trainer.eval_seed": (0, 2**31 - 1), "trainer.eval_seeds": (1, 64), "trainer.keep_checkpoints": (1, 1000),
    "lora.rank": (1, 1024), "lora.alpha": (0, 1e4), "ray.num_workers": (1, 4096), "ray.start_timeout_s": (0, 3600.0),
    "ddpo.inner_epochs": (1, 100), "ddpo.clip_range": (0, 100.0), "ddpo.adv_clip_max": (0, 1e3),
    "grpo.inner_epochs": (1, 100), "grpo.clip_range": (0, 100.0), "grpo.adv_clip_max": (0, 1e3),
    "grpo.kl_coef": (0, 1e6), "grpo.group_size": (1, 4096), "ddpo.updates_per_epoch": (1, 1024),
    "grpo.updates_per_epoch": (1, 1024), "trainer.images_per_prompt": (1, 4096), "optim.kl_coef": (0, 1e6),
    "draft_lv.copies": (1, 64), "drtune.train_steps": (1, 1000),
}
MAX_REWARD_WEIGHT = 1e9


def _check_bounds(cfg: RunConfig) -> None:
    values = flatten(to_dict(cfg))
    for key, (low, high) in BOUNDS.items():
        value = values[key]
        shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high)]
        _check(low <= value <= high, key, f"got {value}; accepted: {shown[0]} <= {key.split('.')[-1]} <= {shown[1]}")
    for section in ("rewards", "eval_rewards"):
        for i, spec in enumerate(getattr(cfg, section)):
            weight = spec.get("weight", 1.0) if isinstance(spec, dict) else 1.0
            if isinstance(weight, (int, float)) and not isinstance(weight, bool):
                _check(abs(weight) <= MAX_REWARD_WEIGHT, f"{section}[{i}].weight",
                       f"got {weight}; accepted: |weight| <= {MAX_REWARD_WEIGHT:g}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks the schema cannot express. Raises ConfigError (one line)."""
    m, s, t, o, tr = cfg.model, cfg.sampling, cfg.truncation, cfg.optim, cfg.trainer
    _check_finite(cfg)
    _check(bool(SAFE_NAME.fullmatch(cfg.name)), "name", f"got {cfg.name!r}; accepted: {SAFE_NAME_TEXT}")
    if cfg.tracking.run_name is not None:
        _check(bool(SAFE_NAME.fullmatch(cfg.tracking.run_name)), "tracking.run_name",
               f"got {cfg.tracking.run_name!r}; accepted: {SAFE_NAME_TEXT}")
    _check(m.tiny + bool(m.pretrained) + (m.arch is not None) == 1, "model",
           "set exactly one of model.pretrained (hub id or local dir), model.tiny=true or model.arch "
           f"({', '.join(ARCH_NAMES)})")
    _check(m.arch is None or m.arch in ARCH_NAMES, "model.arch", f"got {m.arch!r}; accepted: {', '.join(ARCH_NAMES)}")
    _check(m.arch is None or m.family in ("auto", "sd"), "model.family",
           f"got {m.family!r} with model.arch={m.arch}; accepted: auto or sd")
    _check(m.dtype in DTYPE_NAMES, "model.dtype", f"got {m.dtype!r}; accepted: {', '.join(DTYPE_NAMES)}")
    _check(m.family in FAMILY_CHOICES, "model.family", f"got {m.family!r}; accepted: {', '.join(FAMILY_CHOICES)}")
    _check(m.t5 or m.family in ("sd3", "auto"), "model.t5",
           f"false applies to model.family sd3 only (got family {m.family!r}); accepted: true, or model.family=sd3")
    _check(cfg.lora.rank >= 1, "lora.rank", f"got {cfg.lora.rank}; accepted: an integer >= 1")
    _check(cfg.lora.alpha > 0, "lora.alpha", f"got {cfg.lora.alpha}; accepted: > 0")
    _check(len(cfg.lora.target_modules) > 0, "lora.target_modules",
           "empty; accepted: module names such as to_q, to_k, to_v, to_out.0")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"got {cfg.lora.dropout}; accepted: 0 <= dropout < 1")
    _check(cfg.lora.init in ("gaussian", "kaiming"), "lora.init", f"got {cfg.lora.init!r}; accepted: gaussian, kaiming")
    _check(s.num_steps >= 1, "sampling.num_steps", f"got {s.num_steps}; accepted: an integer >= 1")
    _check(s.guidance_scale >= 1, "sampling.guidance_scale",
           f"got {s.guidance_scale}; accepted: >= 1 (1 disables classifier-free guidance)")
    _check(0 <= s.eta <= 1, "sampling.eta", f"got {s.eta}; accepted: 0 <= eta <= 1")
    _check(s.resolution >= 8 and s.resolution % 8 == 0, "sampling.resolution",
           f"got {s.resolution}; accepted: a multiple of 8, >= 8")
    s.checkpoint_unet = {"true": "all", "false": "none"}.get(str(s.checkpoint_unet).lower(), s.checkpoint_unet)
    _check(s.checkpoint_unet in CHECKPOINT_MODES, "sampling.checkpoint_unet",
           f"got {s.checkpoint_unet!r}; accepted: {', '.join(CHECKPOINT_MODES)} (true = all, false = none)")
    _check(s.activation_budget_mb is None or s.activation_budget_mb >= 0, "sampling.activation_budget_mb",
           f"got {s.activation_budget_mb}; accepted: megabytes >= 0, or null for half the free GPU memory")
    _validate_perf(cfg)
    _validate_truncation(t, s.num_steps)
    _check(o.lr > 0, "optim.lr", f"got {o.lr}; accepted: > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"got {list(o.betas)}; accepted: two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", f"got {o.eps}; accepted: > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"got {o.weight_decay}; accepted: >= 0")
    _check(o.max_grad_norm >= 0, "optim.max_grad_norm", f"got {o.max_grad_norm}; accepted: >= 0 (0 disables clipping)")
    _check(o.grad_accum >= 1, "optim.grad_accum", f"got {o.grad_accum}; accepted: an integer >= 1")
    _check(math.isfinite(o.loss_scale) and o.loss_scale > 0, "optim.loss_scale",
           f"got {o.loss_scale}; accepted: a finite number > 0")
    _check(tr.batch_size >= 1, "trainer.batch_size", f"got {tr.batch_size}; accepted: an integer >= 1")
    _check(tr.max_steps >= 1, "trainer.max_steps", f"got {tr.max_steps}; accepted: an integer >= 1")
    _check(tr.eval_every >= 0, "trainer.eval_every", f"got {tr.eval_every}; accepted: >= 0 (0 disables)")
    _check(tr.ckpt_every >= 1, "trainer.ckpt_every", f"got {tr.ckpt_every}; accepted: an integer >= 1")
    _check(tr.keep_checkpoints >= 1, "trainer.keep_checkpoints",
           f"got {tr.keep_checkpoints}; accepted: an integer >= 1")
    _check(0 <= tr.ema_decay < 1, "trainer.ema_decay", f"got {tr.ema_decay}; accepted: 0 <= decay < 1 (0 disables)")
    _check(tr.early_stop_patience >= 1, "trainer.early_stop_patience",
           f"got {tr.early_stop_patience}; accepted: an integer >= 1")
    specs = [s for s in [*cfg.rewards, *cfg.eval_rewards] if isinstance(s, dict)]
    splits = ("eval", "val") if tr.val_prompts or tr.val_prompt_file else ("eval",)
    evaluated = [f"{split}/{name}" for split in splits
                 for name in ["reward_total", *(s.get('label', s.get('name')) for s in specs)]]
    scales = list(tr.eval_lora_scales)
    _check(bool(scales) and all(isinstance(v, (int, float)) and 0 <= v <= 4 for v in scales)
           and len(set(scales)) == len(scales), "trainer.eval_lora_scales",
           f"got {scales}; accepted: distinct numbers in [0, 4], e.g. [0.5, 1.0] (1.0 is eval/..., s is "
           "eval_lora<s>/...)")
    _check(o.kl_coef >= 0 and (o.kl_coef == 0 or tr.algorithm != "grpo"), "optim.kl_coef",
           f"got {o.kl_coef} with trainer.algorithm={tr.algorithm}; accepted: >= 0 (grpo: 0, its KL is grpo.kl_coef)")
    _check(tr.eval_eta is None or 0 <= tr.eval_eta <= 1, "trainer.eval_eta",
           f"got {tr.eval_eta}; accepted: 0 <= eta <= 1, or null for sampling.eta")
    _check(tr.eval_num_steps is None or 1 <= tr.eval_num_steps <= 1000, "trainer.eval_num_steps",
           f"got {tr.eval_num_steps}; accepted: 1 <= steps <= 1000, or null for sampling.num_steps")
    _check(not (tr.val_prompts and tr.val_prompt_file), "trainer.val_prompts",
           "set at most one of trainer.val_prompts (a list) or trainer.val_prompt_file")
    _check(all(isinstance(p, str) and p.strip() for p in tr.val_prompts), "trainer.val_prompts",
           "contains an empty prompt; accepted: non-empty strings")
    if tr.early_stop_metric == "best":
        tr.early_stop_metric = tr.best_metric
    if tr.early_stop_metric is not None:
        _check(tr.early_stop_metric in evaluated and tr.eval_every > 0, "trainer.early_stop_metric",
               f"got {tr.early_stop_metric!r}; accepted (with trainer.eval_every > 0): best (trainer.best_metric), "
               f"{', '.join(evaluated)}")
    _check(tr.best_metric in evaluated, "trainer.best_metric",
           f"got {tr.best_metric!r}; accepted: {', '.join(evaluated)} (the higher the better)")
    _check(bool(tr.prompts) != bool(tr.prompt_file), "trainer.prompts",
           "set exactly one of trainer.prompts (a list) or trainer.prompt_file")
    _check(all(isinstance(p, str) and p.strip() for p in [*tr.prompts, *tr.eval_prompts]), "trainer.prompts",
           "contains an empty prompt; accepted: non-empty strings")
    _check(not (tr.eval_prompts and tr.eval_prompt_file), "trainer.eval_prompts",
           "set at most one of trainer.eval_prompts (a list) or trainer.eval_prompt_file")
    _check(tr.eval_every == 0 or bool(tr.eval_prompts or tr.eval_prompt_file), "trainer.eval_prompts",
           "empty while trainer.eval_every > 0; accepted: a list of held-out prompts, trainer.eval_prompt_file, or "
           "trainer.eval_every=0")
    _validate_algorithm(cfg)
    _check_bounds(cfg)
    validate_reward_specs(cfg.rewards, "rewards", allow_empty=False,
                          needs_gradient=tr.algorithm not in ("ddpo", "grpo"))
    validate_reward_specs(cfg.eval_rewards, "eval_rewards", allow_empty=True)
    d = cfg.deepspeed
    _check(d.zero_stage in (0, 1, 2), "deepspeed.zero_stage", f"got {d.zero_stage}; accepted: 0, 1, 2")
    _check(d.precision in ("auto", "fp32", "bf16", "fp16"), "deepspeed.precision",
           f"got {d.precision!r}; accepted: auto, fp32, bf16, fp16")
    _check(d.precision in ("auto", "fp32") or cfg.ray.use_gpu, "deepspeed.precision",
           f"got {d.precision!r} with ray.use_gpu=false; accepted on CPU: auto, fp32")
    r = cfg.ray
    _check(r.num_workers >= 1, "ray.num_workers", f"got {r.num_workers}; accepted: an integer >= 1")
    _check(r.max_failures >= -1, "ray.max_failures", f"got {r.max_failures}; accepted: >= 0, or -1 for unlimited")
    _check(all(v >= 0 for v in r.resources_per_worker.values()), "ray.resources_per_worker",
           "accepted: non-negative amounts, e.g. {CPU: 1, GPU: 1}")
    _check(r.use_gpu or not r.resources_per_worker.get("GPU"), "ray.resources_per_worker",
           "asks for GPU with ray.use_gpu=false; accepted: ray.use_gpu=true with GPU, or no GPU key")
    _check(r.resource_wait_s is None or r.resource_wait_s >= 0, "ray.resource_wait_s",
           f"got {r.resource_wait_s}; accepted: >= 0 seconds")
    uri = cfg.tracking.uri
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if uri and "://" in uri else None
    _check(uri is None or scheme in TRACKING_SCHEMES, "tracking.uri",
           f"got {uri!r}; accepted: a URI with scheme {', '.join(TRACKING_SCHEMES)}, such as sqlite:///abs/path.db "
           "or http://127.0.0.1:5000")


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
    _check(0 < d.timestep_fraction <= 1, "ddpo.timestep_fraction",
           f"got {d.timestep_fraction}; accepted: 0 < fraction <= 1")
    _check(d.stats_buffer >= 1 and d.stats_min_count >= 1, "ddpo.stats_buffer",
           f"got buffer {d.stats_buffer}, min_count {d.stats_min_count}; accepted: integers >= 1")
    if a == "ddpo":
        _check(cfg.sampling.eta > 0, "sampling.eta",
               "got 0 with trainer.algorithm=ddpo; accepted: 0 < eta <= 1 (DDPO's policy is the stochastic DDIM "
               "step; ddpo-pytorch: 1.0)")
    g, accum = cfg.grpo, cfg.optim.grad_accum
    _check(g.clip_range > 0, "grpo.clip_range", f"got {g.clip_range}; accepted: > 0")
    _check(g.adv_clip_max > 0, "grpo.adv_clip_max", f"got {g.adv_clip_max}; accepted: > 0")
    _check(g.kl_coef >= 0, "grpo.kl_coef", f"got {g.kl_coef}; accepted: >= 0 (0: no KL term)")
    _check(0 < g.timestep_fraction <= 1, "grpo.timestep_fraction",
           f"got {g.timestep_fraction}; accepted: 0 < fraction <= 1")
    _check(0 < g.sde_noise <= 10, "grpo.sde_noise", f"got {g.sde_noise}; accepted: 0 < noise <= 10 (Flow-GRPO: 0.7)")
    for section, updates in (("ddpo", d.updates_per_epoch), ("grpo", g.updates_per_epoch)):
        _check(updates >= 1 and accum % updates == 0, f"{section}.updates_per_epoch",
               f"got {updates} with optim.grad_accum={accum}; accepted: a divisor of optim.grad_accum (each update "
               "takes grad_accum / updates_per_epoch micro-batches)")
    images = cfg.trainer.batch_size * accum * cfg.ray.num_workers
    group, key = (g.group_size, "grpo.group_size") if a == "grpo" else (cfg.trainer.images_per_prompt,
                                                                        "trainer.images_per_prompt")
    _check(group >= 1 and images % group == 0, key,
           f"got {group}; accepted: a divisor of the images per step (trainer.batch_size × optim.grad_accum × "
           f"ray.num_workers = {images})")
    _check(a != "grpo" or group >= 2, key, f"got {group}; accepted: >= 2 (advantages are relative within a group)")
    low, high = refl_bounds(cfg)
    _check(0 <= low <= high <= n - 1, "refl.low",
           f"got low={low}, high={high}; accepted: 0 <= low <= high <= sampling.num_steps - 1 ({n - 1})")
    _check(cfg.draft_lv.copies >= 1, "draft_lv.copies", f"got {cfg.draft_lv.copies}; accepted: an integer >= 1")
    _check(a != "drtune" or cfg.drtune.train_steps <= n, "drtune.train_steps",
           f"got {cfg.drtune.train_steps}; accepted: 1 <= train_steps <= sampling.num_steps ({n})")
    low, high = cfg.direct_align.t_low, cfg.direct_align.t_high
    _check(a != "direct_align" or (0 <= low < high <= 1 and int(low * n) < math.ceil(high * n)), "direct_align.t_low",
           f"got t_low={low}, t_high={high} with sampling.num_steps={n}; accepted: 0 <= t_low < t_high <= 1 "
           "spanning at least one sampling step")


def _validate_perf(cfg: RunConfig) -> None:
    p = cfg.perf
    _check(p.autocast in ("none", "bf16", "fp16"), "perf.autocast", f"got {p.autocast!r}; accepted: none, bf16, fp16")
    _check(p.autocast == "none" or cfg.deepspeed.precision in ("auto", "fp32"), "perf.autocast",
           f"got {p.autocast} with deepspeed.precision={cfg.deepspeed.precision}; accepted: none, or "
           "deepspeed.precision auto/fp32 (autocast keeps fp32 LoRA weights)")
    _check(p.attention in ("sdpa", "eager"), "perf.attention", f"got {p.attention!r}; accepted: sdpa, eager")
    _check(p.lora_prefix in ("fold", "wrapped"), "perf.lora_prefix", f"got {p.lora_prefix!r}; accepted: fold, wrapped")
    _check(p.compile_mode in COMPILE_MODES, "perf.compile_mode",
           f"got {p.compile_mode!r}; accepted: {', '.join(COMPILE_MODES)}")


def _validate_truncation(t: TruncationSection, n: int) -> None:
    strategies = ("fixed", "uniform", "gaussian", "per_step")
    _check(t.strategy in strategies, "truncation.strategy", f"got {t.strategy!r}; accepted: {', '.join(strategies)}")
    if t.strategy == "fixed":
        _check(1 <= t.k <= n, "truncation.k", f"got {t.k}; accepted: 1 <= k <= sampling.num_steps ({n})")
    elif t.strategy in ("uniform", "gaussian"):
        _check(1 <= t.low <= t.high <= n, "truncation.low",
               f"got low={t.low}, high={t.high}; accepted: 1 <= low <= high <= sampling.num_steps ({n})")
    if t.strategy == "gaussian" and t.cut_mean is None:
        _check(math.isfinite(t.mean) and 0 <= t.mean <= n, "truncation.mean",
               f"got {t.mean}; accepted: a finite number in [0, sampling.num_steps ({n})]")
        _check(math.isfinite(t.std) and t.std > 0, "truncation.std", f"got {t.std}; accepted: a finite number > 0")
    elif t.strategy == "gaussian":
        _check(math.isfinite(t.cut_mean) and 0 <= t.cut_mean <= n, "truncation.cut_mean",
               f"got {t.cut_mean}; accepted: a finite number in [0, sampling.num_steps ({n})], or null to use "
               "truncation.mean")
        _check(math.isfinite(t.cut_std) and t.cut_std > 0, "truncation.cut_std",
               f"got {t.cut_std}; accepted: a finite number > 0")
    if t.strategy == "per_step":
        high = n if t.cut_high is None else t.cut_high
        _check(0 <= t.cut_low <= high <= n, "truncation.cut_low",
               f"got cut_low={t.cut_low}, cut_high={t.cut_high}; accepted: 0 <= cut_low <= cut_high <= "
               f"sampling.num_steps ({n}) (cut_high null: {n})")
