"""Differentiable sampling with truncated backpropagation (the heart of AlignProp): DDIM for SD 1.x/2.x
and SDXL, flow-matching Euler for SD3 (the family's part is `trainers/families.py`).

Which denoising steps keep a gradient (`truncation.strategy`):

* contiguous (the default; `fixed`, `uniform`, `gaussian`): the last K steps. The first N−K steps
  run under `torch.no_grad()` (no graph, no saved activations); only the window keeps a graph, each
  UNet call wrapped in activation checkpointing, so memory grows with K, not N. K is drawn per
  (optimizer step, micro-batch) from a generator seeded by (seed, step, micro-batch) alone: every
  rank uses the same K (no stragglers in the all-reduce), a resumed run replays the same sequence,
  and an update sees one K draw per micro-batch. `gaussian` takes either `mean`/`std` on K (rounded,
  clipped to [low, high]) or, to copy the official v2 numbers, `cut_mean`/`cut_std` on the CUT
  index c (K = N − c; c = int(N(cut_mean, cut_std)), truncated toward zero, redrawn while K falls
  outside [low, high] as the official code redraws, clipped after 100 draws). Official v2
  (mihirp1998/AlignProp sd_pipeline.py L124-131, config/alignprop_config.py L111-112): c ~
  N(42, 5), redrawn until 1 <= c < N, for N = 50 → `cut_mean=42 cut_std=5 low=1 high=49` (K ≈ 8).
* `per_step`, for reproductions of the official v1 code and TRL 0.23.1's AlignPropTrainer: at EVERY
  denoising step i (0-based) a cut c_i ~ U{cut_low..cut_high} is drawn and step i's UNet output is
  detached when i < c_i, so the steps that keep a gradient are scattered (each step keeps one with
  probability (i − cut_low + 1)/(cut_high − cut_low + 1), clamped to [0, 1]). The sources, both drawing with Python's
  global `random` inside the denoising loop:
    - mihirp1998/AlignProp main.py @a831a5f (v1, the paper's figures) L483-492:
      `timestep = random.randint(config.truncated_backprop_minmax[0], ...[1])` per step, minmax
      (0, 50) for N = 50, `if i < timestep:` detach both uncond and cond noise predictions;
    - huggingface/trl v0.23.1 trl/models/modeling_sd_base.py `pipeline_step_with_grad` L741-755:
      `rand_timestep = random.randint(minmax[0], minmax[1])` per step, default minmax (0, 50),
      `if i < rand_timestep: noise_pred = noise_pred.detach()`.
  `random.randint` includes both ends, so the defaults cut_low=0, cut_high=N give U{0..N} per step.
  The graph runs through all N scheduler steps (after the first step that keeps a gradient, the
  latents carry one, so a later detached step still passes the gradient through DDIM's x_t term,
  exactly as `.detach()` does in the reference); a detached step's UNet call runs under
  `torch.no_grad()`, which gives the same values and the same gradients as calling it with a graph
  and detaching its output, without saving its activations. UNet calls that keep a gradient are
  checkpointed as in the contiguous mode. Slower than the contiguous mode for the same number of
  gradient steps, because the scattered steps are spread over the whole chain.

Activation checkpointing of the denoiser calls that keep a graph (`sampling.checkpoint_unet`,
`CheckpointPlan`): `all` (every call recomputed in backward: memory of one call), `none` (every
call keeps its activations: memory × K, no recomputation), `auto`: the first call keeps its
activations and measures them (the bytes autograd saves, parameters excluded); the following calls
keep theirs while the total fits `sampling.activation_budget_mb` and are checkpointed after that.
The gradients are the same in every mode; only memory and time differ.
"""

from __future__ import annotations

import contextlib
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint

from ..platform.config import CHECKPOINT_MODES, TruncationSection
from ..platform.models.lora import LoraFold, adapters_disabled
from .families import Conditioning, denoiser_of, family_of, transition_kl, with_guidance

CONTIGUOUS = ("fixed", "uniform", "gaussian")
# auto: activation bytes of one denoiser call, per denoiser and (input shape, dtype, autocast)
_SAVED_BYTES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, int]]" = weakref.WeakKeyDictionary()
MAX_REDRAWS = 100  # cut_mean/cut_std: redraws (like the official loop) before clipping


def _rng(seed: int, step: int, micro: int) -> random.Random:
    # A str seed is hashed with SHA-512 by `random.Random` (not Python's per-process salted hash):
    # the same (seed, step, micro) gives the same stream on every rank, process and resume.
    return random.Random(f"alignprop-truncation/{seed}/{step}/{micro}")


def draw_k(truncation: TruncationSection, num_steps: int, seed: int, step: int, micro: int = 0) -> int:
    """The truncation depth K of a contiguous strategy for (optimizer step, micro-batch): a pure
    function of (seed, step, micro), so the same on every rank and replayed on resume."""
    rng = _rng(seed, step, micro)
    t = truncation
    if t.strategy == "fixed":
        k = t.k
    elif t.strategy == "uniform":
        k = rng.randint(t.low, t.high)
    elif t.strategy == "gaussian" and t.cut_mean is not None:
        for _ in range(MAX_REDRAWS):
            k = num_steps - int(rng.gauss(t.cut_mean, t.cut_std))  # int(): as the official code
            if t.low <= k <= t.high:
                break
        k = min(max(k, t.low), t.high)
    elif t.strategy == "gaussian":
        k = round(rng.gauss(t.mean, t.std))
        k = min(max(k, t.low), t.high)
    else:
        raise ValueError(f"truncation.strategy: {t.strategy!r} has no single K; accepted: {', '.join(CONTIGUOUS)}")
    return max(1, min(k, num_steps))


def draw_cuts(truncation: TruncationSection, num_steps: int, seed: int, step: int, micro: int = 0) -> list[int]:
    """`per_step`: one cut c_i ~ U{cut_low..cut_high} per denoising step i (step i detached when i < c_i)."""
    rng = _rng(seed, step, micro)
    high = num_steps if truncation.cut_high is None else truncation.cut_high
    return [rng.randint(truncation.cut_low, high) for _ in range(num_steps)]


def steps_from_cuts(cuts: Sequence[int]) -> list[int]:
    """The steps that keep a gradient given per-step cuts: i with i >= cuts[i]."""
    return [i for i, cut in enumerate(cuts) if i >= cut]


def draw_grad_steps(truncation: TruncationSection, num_steps: int, seed: int, step: int, micro: int = 0) -> list[int]:
    """The (0-based) denoising steps that keep a gradient for (optimizer step, micro-batch)."""
    if truncation.strategy == "per_step":
        return steps_from_cuts(draw_cuts(truncation, num_steps, seed, step, micro))
    return list(grad_window(num_steps, draw_k(truncation, num_steps, seed, step, micro)))


def grad_window(num_steps: int, k: int) -> range:
    """Indices (0-based, in sampling order) of the steps that keep a graph: the last k."""
    return range(num_steps - k, num_steps)


def encode_prompts(pipe, prompts: Sequence[str], device: torch.device) -> Conditioning:
    """The frozen text conditioning of the pipeline's family (`trainers/families.py`)."""
    return family_of(pipe).encode(pipe, prompts, device)


def negative_prompt(pipe, batch: int, device: torch.device) -> Conditioning:
    """The unconditional input of classifier-free guidance, as the family's pipeline builds it."""
    return family_of(pipe).negative(pipe, device).expand(batch)


@dataclass
class SampleOutput:
    images: torch.Tensor  # B×3×H×W in [0, 1]; differentiable through the window
    latents: torch.Tensor
    grad_steps: list[int]  # the step indices that ran with a graph (for tests and logging)
    kept: int = 0  # denoiser calls with a graph that kept their activations
    recomputed: int = 0  # ... that were checkpointed (recomputed in backward)
    kept_bytes: int = 0  # what the kept calls' activations hold (measured under auto)


@dataclass(frozen=True)
class SamplerSettings:
    """How the family's sampler runs (`sampling:` of the config): N steps, CFG scale, DDIM's η, image
    side, and whether the VAE decode is checkpointed."""

    num_steps: int
    guidance_scale: float
    eta: float
    resolution: int
    checkpoint_vae: bool = False

    @classmethod
    def of(cls, sampling) -> "SamplerSettings":
        return cls(sampling.num_steps, sampling.guidance_scale, sampling.eta, sampling.resolution,
                   sampling.checkpoint_vae)


def sample(
    pipe,
    denoiser: Callable,
    prompt_embeds: Conditioning,
    negative_embeds: Conditioning,
    generator: torch.Generator,
    settings: SamplerSettings,
    *,
    k: int = 1,
    grad_steps: Optional[Sequence[int]] = None,
    checkpoint_unet: Union[bool, str, "CheckpointPlan"] = "all",
    stop_at: Optional[int] = None,
    trajectory: Optional[list] = None,
    prefix_denoiser: Optional[Callable] = None,
    phases: Optional["PhaseTimer"] = None,
    kl_terms: Optional[list] = None,
    fold: Optional[LoraFold] = None,
    stop_input_grad: bool = False,
) -> SampleOutput:
    """The family's sampler (DDIM for sd/sdxl, flow-matching Euler for sd3) with classifier-free
    guidance; gradients flow through the last `k` steps only, or, given `grad_steps` (e.g.
    `per_step`'s scattered steps), through the denoiser calls of those steps.

    `denoiser` is the (LoRA-wrapped, possibly DeepSpeed-managed) UNet or transformer; `generator` (on
    CPU) fixes the initial noise and DDIM's eta-noise, so a (seed, step) pair replays exactly. A
    denoiser call outside the kept steps runs under `no_grad` (= the reference's
    `noise_pred.detach()`); the CFG combination and the scheduler step keep their graph, which is
    empty until the first kept step (the contiguous prefix therefore builds no graph at all).

    `stop_at` (ReFL): at that step, x̂0 is predicted in one step from its denoiser output and decoded;
    the later steps are not run. `trajectory` (DDPO): a list that gets one `(t, x_t, guided
    prediction, x_next)` tuple per step, detached. `checkpoint_unet`: all/True, none/False, auto, or a
    `CheckpointPlan` (whose counters the caller reads). `prefix_denoiser`: the denoiser for the calls
    that keep no graph (e.g. a `torch.compile`d copy; same weights). `phases`: a `PhaseTimer` that
    gets `prefix` (the no-graph steps before the first kept one), `window` and `decode`. `kl_terms`
    (`optim.kl_coef`): a list that gets, for every step that keeps a graph, the per-sample
    `transition_kl` of the step to the base model's (one more denoiser call, adapter off, no graph).
    `fold` (`perf.lora_prefix: fold`): the calls before the first kept step (all of them without a
    graph) run with the LoRA folded into the weights; the window runs the wrapped layers.
    `stop_input_grad` (DRTune): every denoiser call gets x_t detached, so the gradient reaches a kept
    call's parameters through the scheduler's linear updates only, never through another call's input.
    """
    num_steps, guidance_scale, eta, resolution = (settings.num_steps, settings.guidance_scale, settings.eta,
                                                  settings.resolution)
    family, scheduler = family_of(pipe), pipe.scheduler
    device, batch = prompt_embeds.embeds.device, prompt_embeds.batch
    latents = initial_noise(pipe, batch, resolution, generator, device)
    family.set_timesteps(pipe, num_steps, device, latents.shape)
    text = guidance_text(denoiser, prompt_embeds, negative_embeds, guidance_scale)
    window = sorted(set(grad_steps)) if grad_steps is not None else list(grad_window(num_steps, k))
    keep = set(window)
    grad_allowed = torch.is_grad_enabled()  # an outer no_grad (evaluation) wins over the window
    plan = CheckpointPlan.of(checkpoint_unet)
    first_kept = window[0] if window and grad_allowed else None
    with contextlib.ExitStack() as folding:  # closed (the LoRA unfolded) before the first step with a graph
        if fold is not None and first_kept != 0:
            folding.enter_context(fold.folded())
        for i, t in enumerate(scheduler.timesteps):
            with_graph = grad_allowed and i in keep
            if i == first_kept:
                folding.close()
                if phases is not None:
                    phases.mark("prefix")
            model = denoiser if with_graph or prefix_denoiser is None else prefix_denoiser
            with torch.set_grad_enabled(with_graph):
                noise = guided_prediction(pipe, model, latents.detach() if stop_input_grad else latents, t, text,
                                          guidance_scale, resolution, plan if with_graph else None)
            with torch.set_grad_enabled(grad_allowed):  # the latents' own path keeps its graph
                if kl_terms is not None and with_graph:
                    kl_terms.append(base_step_kl(pipe, model, latents, t, text, noise, settings))
                if i == stop_at:
                    latents = family.predict_x0(scheduler, noise, t, latents)
                    break
                variance_noise = torch.randn(latents.shape, generator=generator).to(device) if eta > 0 else None
                previous = latents
                latents = family.step(scheduler, noise, t, latents, eta, variance_noise)
                if trajectory is not None:
                    trajectory.append((t, previous.detach(), noise.detach(), latents.detach()))
    if phases is not None:
        phases.mark("window" if first_kept is not None else "prefix")
    images = decode(pipe.vae, latents, settings.checkpoint_vae)
    if phases is not None:
        phases.mark("decode")
    return SampleOutput(images=images, latents=latents, grad_steps=window if grad_allowed else [],
                        kept=plan.kept, recomputed=plan.recomputed, kept_bytes=plan.kept_bytes)


def initial_noise(pipe, batch: int, resolution: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The sampler's x_T: the first draws of `generator` (on CPU), batch × C × side/8 × side/8."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (batch, denoiser_of(pipe).config.in_channels, resolution // scale, resolution // scale)
    return torch.randn(shape, generator=generator).to(device) * getattr(pipe.scheduler, "init_noise_sigma", 1.0)


def base_step_kl(pipe, denoiser, latents: torch.Tensor, t: torch.Tensor, text: Conditioning, pred: torch.Tensor,
                 settings: "SamplerSettings") -> torch.Tensor:
    """`transition_kl` of the step with prediction `pred` (with its graph) to the base model's step from the
    same x_t: the base's prediction under no_grad with the LoRA adapter off."""
    with torch.no_grad(), adapters_disabled(denoiser_of(pipe)):
        ref = guided_prediction(pipe, denoiser, latents.detach(), t, text, settings.guidance_scale, settings.resolution,
                                None)
    return transition_kl(family_of(pipe), pipe.scheduler, pred, ref, t, latents, settings.eta)


def guidance_text(denoiser, prompt_embeds: Conditioning, negative_embeds: Conditioning,
                  guidance_scale: float) -> Conditioning:
    """The conditioning of one denoiser call: [negative; positive] under guidance, in the denoiser's dtype."""
    text = with_guidance(negative_embeds, prompt_embeds) if guidance_scale > 1 else prompt_embeds
    return text.to(next(denoiser.parameters()).dtype)


def guided_prediction(pipe, denoiser, latents: torch.Tensor, t: torch.Tensor, text: Conditioning,
                      guidance_scale: float, resolution: int, plan: Optional["CheckpointPlan"]) -> torch.Tensor:
    """The denoiser's classifier-free-guided prediction at `t` (a scalar, or one per sample), float32;
    a call that keeps a graph goes through `plan` (activation checkpointing or not); None: a plain call."""
    family, guided = family_of(pipe), guidance_scale > 1
    latent_in = torch.cat([latents] * 2) if guided else latents
    latent_in = family.scale_input(pipe.scheduler, latent_in, t).to(next(denoiser.parameters()).dtype)
    t_in = torch.cat([t] * 2) if guided and t.ndim else t

    def denoise(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return family.denoise(denoiser, x, timestep, text, resolution)

    key = (tuple(latent_in.shape), latent_in.dtype, torch.is_autocast_enabled(latent_in.device.type))
    with_plan = plan is not None and torch.is_grad_enabled()
    pred = (plan.call(key, denoiser, denoise, latent_in, t_in) if with_plan else denoise(latent_in, t_in)).float()
    if guided:
        uncond, cond = pred.chunk(2)
        pred = uncond + guidance_scale * (cond - uncond)
    return pred


def draft_lv_images(pipe, denoiser, prompt_embeds: Conditioning, negative_embeds: Conditioning, x0: torch.Tensor,
                    copies: int, generator: torch.Generator, settings: SamplerSettings, *,
                    checkpoint_unet: Union[bool, str, "CheckpointPlan"] = "all",
                    kl_terms: Optional[list] = None) -> torch.Tensor:
    """DRaFT-LV: `copies` times, re-noise the sampled x0 (no gradient into it) to the last step's noise
    level and take that last step again with a graph; returns the copies' images (copies·B×3×H×W)."""
    guidance_scale, eta, resolution = settings.guidance_scale, settings.eta, settings.resolution
    family, scheduler = family_of(pipe), pipe.scheduler
    text = guidance_text(denoiser, prompt_embeds, negative_embeds, guidance_scale)
    plan = CheckpointPlan.of(checkpoint_unet)
    t, images = scheduler.timesteps[-1], []
    for _ in range(copies):
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x1 = family.renoise(scheduler, x0.detach(), noise, t)
        pred = guided_prediction(pipe, denoiser, x1, t, text, guidance_scale, resolution, plan)
        if kl_terms is not None:
            kl_terms.append(base_step_kl(pipe, denoiser, x1, t, text, pred, settings))
        variance_noise = torch.randn(x0.shape, generator=generator).to(x0.device) if eta > 0 else None
        latents = family.last_step(scheduler, pred, t, x1, eta, variance_noise)
        images.append(decode(pipe.vae, latents, settings.checkpoint_vae))
    return torch.cat(images)


def decode(vae, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
    """Latents → images in [0, 1] (differentiable)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's VAE is shifted as well as scaled
    z = (latents / vae.config.scaling_factor + shift).to(vae.dtype)

    def run(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, return_dict=False)[0]

    pixels = checkpoint(run, z, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else run(z)
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class CheckpointPlan:
    """Which denoiser calls that keep a graph are activation-checkpointed, for one sampled batch
    (`sampling.checkpoint_unet` all | none | auto; True/False mean all/none). `auto` keeps the
    activations of calls while their measured bytes fit `budget_mb` (None: `default_budget_mb`) and
    checkpoints the rest; the first call of a shape is measured without checkpointing (a checkpointed
    call's recomputation holds the same activations in backward, so this costs no extra peak)."""

    mode: Union[bool, str] = "all"
    budget_mb: Optional[float] = None
    kept: int = 0
    recomputed: int = 0
    kept_bytes: int = 0
    budget: int = field(init=False, default=0)

    @classmethod
    def of(cls, checkpoint_unet: Union[bool, str, "CheckpointPlan"]) -> "CheckpointPlan":
        """A caller's plan as it is (its counters are read afterwards), or a fresh one for a mode."""
        return checkpoint_unet if isinstance(checkpoint_unet, cls) else cls(checkpoint_unet)

    def __post_init__(self):
        self.mode = {True: "all", False: "none"}.get(self.mode, self.mode)
        if self.mode not in CHECKPOINT_MODES:
            raise ValueError(f"sampling.checkpoint_unet: got {self.mode!r}; accepted: {', '.join(CHECKPOINT_MODES)}")

    def call(self, key: tuple, unet, fn: Callable, *args):
        measured = _SAVED_BYTES.setdefault(unet, {})
        if self.mode == "all" or (self.mode == "auto" and not self._fits(measured.get(key), unet)):
            self.recomputed += 1
            return checkpoint(fn, *args, use_reentrant=False)
        self.kept += 1
        if self.mode == "auto" and key not in measured:
            out, measured[key] = saved_bytes(unet, fn, *args)
            self.kept_bytes += measured[key]
            return out
        self.kept_bytes += measured.get(key, 0)
        return fn(*args)

    def _fits(self, need: Optional[int], unet) -> bool:
        if need is None:
            return True  # measured by this call
        if not self.budget:
            self.budget = int((self.budget_mb if self.budget_mb is not None else default_budget_mb(unet)) * 2**20)
        return self.kept_bytes + need <= self.budget


def default_budget_mb(unet) -> float:
    """`sampling.activation_budget_mb: null`: half of what the device can still give (CUDA: free
    memory plus the allocator's unused cache), a quarter of MemAvailable on CPU."""
    device = next(unet.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (free + cached) / 2 / 2**20
    try:
        with open("/proc/meminfo") as info:
            available_kb = next(int(line.split()[1]) for line in info if line.startswith("MemAvailable:"))
        return available_kb / 4 / 1024
    except (OSError, StopIteration):
        return 1024.0


def saved_bytes(unet, fn: Callable, *args) -> tuple[torch.Tensor, int]:
    """Run `fn(*args)` and count the bytes of the distinct storages autograd saves for backward,
    the module's parameters excluded (they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*args)
    return out, sum(seen.values())


class PhaseTimer:
    """Seconds per phase of a step: `mark(name)` closes the phase that began at the previous mark
    (synchronising CUDA first, so the time is the device's, not the launch's)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now
