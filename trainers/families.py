"""Model families: the few places where SD 1.x/2.x, SDXL and SD3-style flow matching differ inside
the sampling loop. The recipes and the sampler call a family object, never the raw pipeline.

    family = family_of(pipe)                      # sd | sdxl | sd3, from the pipeline's class
    cond = family.encode(pipe, prompts, device)   # Conditioning: embeds (+ pooled)
    pred = family.denoise(model, latents, t, cond, resolution)
    latents = family.step(scheduler, pred, t, latents, eta, noise)

| family | denoiser | text conditioning | scheduler (training sampler) | denoiser's extra inputs |
|---|---|---|---|---|
| `sd`   | UNet (`pipe.unet`) | CLIP last hidden state | DDIM (η from `sampling.eta`) | – |
| `sdxl` | UNet | CLIP-L + OpenCLIP-bigG penultimate states, pooled bigG | DDIM | `text_embeds`, `time_ids` |
| `sd3`  | MMDiT (`pipe.transformer`) | 2 × CLIP (+ T5, optional) | flow-matching Euler | `pooled_projections` |

(`text_embeds`: the pooled bigG state; `time_ids`: size, crop, target size. SD3's Euler sampler is deterministic;
GRPO on sd3 samples Flow-GRPO's SDE form of it instead, `sde_mean_std`.)

For `sd3`, K counts the last K Euler steps: the sampler x_{i+1} = x_i + (σ_{i+1} − σ_i) v_θ(x_i, σ_i)
is differentiable end to end, so truncation, checkpointing and CFG are the same code as DDIM's.
SDXL's VAE overflows in float16: `load_pipeline` keeps it in float32 when its config says
`force_upcast` (as StableDiffusionXLPipeline upcasts it for every decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

FAMILY_NAMES = ("sd", "sdxl", "sd3")
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


@dataclass
class Conditioning:
    """What the denoiser reads of a prompt: the token states and, for SDXL/SD3, a pooled vector."""

    embeds: torch.Tensor  # B×L×D
    pooled: Optional[torch.Tensor] = None  # B×P

    def expand(self, batch: int) -> "Conditioning":
        grow = lambda x: None if x is None else x.expand(batch, *x.shape[1:])  # noqa: E731
        return Conditioning(grow(self.embeds), grow(self.pooled))

    def to(self, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(self.embeds.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]


def with_guidance(negative: Conditioning, positive: Conditioning) -> Conditioning:
    """[negative; positive] along the batch, for one denoiser call under classifier-free guidance."""
    pooled = None if positive.pooled is None else torch.cat([negative.pooled, positive.pooled])
    return Conditioning(torch.cat([negative.embeds, positive.embeds]), pooled)


def ddim_mean_std(scheduler, pred: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and σ of DDIM's p(x_{t−1} | x_t) for per-sample timesteps `t` (B,): diffusers'
    DDIMScheduler.step without its noise (epsilon, v_prediction or sample parameterisation). One
    difference: sqrt(1 − ᾱ_prev − σ²) is clamped at 0, where diffusers gets NaN from rounding at the
    first step of a zero-terminal-SNR schedule (ᾱ_t = 0, as the toy world's) with η = 1."""
    mean, std, _ = _ddim(scheduler, pred, t, x, eta)
    return mean, std


def _ddim(scheduler, pred: torch.Tensor, t: torch.Tensor, x: torch.Tensor, eta: float):
    c = scheduler.config
    prev = t - c.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(x.device)
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha_t = alphas[t.long()].reshape(shape)
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0).long()],
                             scheduler.final_alpha_cumprod.to(x.device)).reshape(shape)
    beta_t = 1 - alpha_t
    if c.prediction_type == "epsilon":
        x0, eps = (x - beta_t.sqrt() * pred) / alpha_t.sqrt(), pred
    elif c.prediction_type == "v_prediction":
        x0, eps = alpha_t.sqrt() * x - beta_t.sqrt() * pred, alpha_t.sqrt() * pred + beta_t.sqrt() * x
    else:  # sample
        x0, eps = pred, (x - alpha_t.sqrt() * pred) / beta_t.sqrt()
    if c.clip_sample:
        x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std, x0


def sde_mean_std(scheduler, pred: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                 noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE form of a flow-matching Euler step, for per-sample timesteps `t` (B,) or one:
    (mean of x_next, its σ = std_dev_t·sqrt(−dt), std_dev_t). From yifan123/flow_grpo
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py `sde_step_with_logprob` (sde_type 'sde'), without the
    sampling and the log-probability (`ddpo.gaussian_log_prob` of the mean and σ is its log_prob)."""
    pred, x = pred.float(), x.float()
    times = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t
    index = torch.tensor([scheduler.index_for_timestep(time) for time in times])
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigmas = scheduler.sigmas.to(x.device, torch.float32)
    sigma, sigma_prev = sigmas[index].view(shape), sigmas[index + 1].view(shape)
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + pred * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * torch.sqrt(-1 * dt), std_dev_t


def transition_kl(family, scheduler, pred: torch.Tensor, ref: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                  eta: float) -> torch.Tensor:
    """Per sample (B,): how far the tuned step (prediction `pred`) is from the base step (`ref`) at x_t.
    A stochastic step (eta > 0): the KL of the two Gaussian transitions, mean over pixels of
    (μ − μ_ref)² / (2σ²) (one σ: the schedule's); a deterministic one (DDIM at eta 0, sd3's Euler): the
    mean squared difference of the two predictions. 0 exactly when the predictions are equal."""
    if eta == 0:
        return ((pred - ref) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    mean, std, _ = family.policy_mean_std(scheduler, pred, t, x, eta)
    mean_ref, _, _ = family.policy_mean_std(scheduler, ref, t, x, eta)
    return ((mean - mean_ref) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim)))


class NaNFreeDDIMScheduler(DDIMScheduler):
    """DDIMScheduler whose stochastic step (η > 0) is `ddim_mean_std` plus σ·noise: the same numbers
    (bitwise, tested), without diffusers' NaN at ᾱ_t = 0. The training sampler and the pipelines of
    `alignprop sample` and the MLflow Model use it, so η = 1 works on zero-terminal-SNR models."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        if eta == 0 or use_clipped_model_output or self.config.thresholding:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(len(sample))
        mean, std, x0 = _ddim(self, model_output, t, sample, eta)
        if variance_noise is None:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
        prev = (mean + std * variance_noise).to(sample.dtype)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


class SDFamily:
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, DDIM."""

    name, denoiser_name, lora_prefix = "sd", "unet", "unet"
    pipeline_name = "StableDiffusionPipeline"  # diffusers' class, as model_index.json's _class_name

    def load_kwargs(self, model) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def training_scheduler(self, scheduler):
        return NaNFreeDDIMScheduler.from_config(scheduler.config)

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], device: torch.device) -> Conditioning:
        tokens = pipe.tokenizer(
            list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)
        return Conditioning(pipe.text_encoder(tokens)[0])

    def negative(self, pipe, device: torch.device) -> Conditioning:
        return self.encode(pipe, [""], device)

    def scale_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latents, t)

    def denoise(self, model, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                resolution: int) -> torch.Tensor:
        return model(latents, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def set_timesteps(self, pipe, num_steps: int, device: torch.device, latent_shape) -> None:
        pipe.scheduler.set_timesteps(num_steps, device=device)

    def step(self, scheduler, pred, t, latents, eta: float, variance_noise) -> torch.Tensor:
        return scheduler.step(pred, t, latents, eta=eta, variance_noise=variance_noise).prev_sample

    def last_step(self, scheduler, pred, t, latents, eta: float, variance_noise) -> torch.Tensor:
        """The sampler's final step again, after a full run (DRaFT-LV's re-noised copies)."""
        return self.step(scheduler, pred, t, latents, eta, variance_noise)

    def policy_mean_std(self, scheduler, pred, t, latents, eta: float):
        """The stochastic step as a Gaussian policy (DDPO, GRPO): (mean, σ, the σ of GRPO's KL term)."""
        mean, std = ddim_mean_std(scheduler, pred, t.reshape(-1).expand(len(latents)), latents, eta)
        return mean, std, std

    def predict_x0(self, scheduler, pred, t, latents) -> torch.Tensor:
        """x̂0 from one prediction at t (DDIM's pred_original_sample; ReFL's one-step estimate)."""
        return scheduler.step(pred, t, latents, eta=0.0).pred_original_sample

    def renoise(self, scheduler, x0, noise, t) -> torch.Tensor:
        """x0 noised to step t's level: q(x_t | x0)."""
        return scheduler.add_noise(x0, noise, t.reshape(1))

    def noise_coefficients(self, scheduler, i: int, after: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with x = a·x0 + b·ε at step i's level, timesteps[i] (`after`: the level step i lands on,
        timesteps[i] − ⌊T/N⌋ as DDIM's step computes it, ᾱ_final below 0): sqrt(ᾱ), sqrt(1 − ᾱ)."""
        t = int(scheduler.timesteps[i])
        if after:
            t -= scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alpha = scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod
        return alpha.sqrt(), (1 - alpha).sqrt()

    def step_at(self, scheduler, pred, i: int, latents) -> torch.Tensor:
        """The deterministic (η = 0) step from sampling index i to i + 1."""
        return scheduler.step(pred, scheduler.timesteps[i], latents, eta=0.0).prev_sample

    def call_kwargs(self, sampling) -> dict:
        """Keyword arguments of the family's own diffusers pipeline call (`alignprop sample`, MLflow Model)."""
        return {"num_inference_steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale,
                "eta": sampling.eta, "height": sampling.resolution, "width": sampling.resolution}


class SDXLFamily(SDFamily):
    """SDXL: two CLIP encoders (penultimate states concatenated, pooled from the second), a UNet
    with added conditioning (pooled text + size/crop ids), DDIM."""

    name, pipeline_name = "sdxl", "StableDiffusionXLPipeline"

    def load_kwargs(self, model) -> dict:
        return {}

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return Conditioning(embeds, pooled)

    def negative(self, pipe, device: torch.device) -> Conditioning:
        cond = self.encode(pipe, [""], device)
        if pipe.config.force_zeros_for_empty_prompt:  # SDXL base: the unconditional input is zeros
            return Conditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled))
        return cond

    def denoise(self, model, latents, t, cond: Conditioning, resolution: int) -> torch.Tensor:
        # (original size, crop top-left, target size), as StableDiffusionXLPipeline's defaults
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=latents.device,
                                dtype=cond.embeds.dtype).expand(latents.shape[0], -1)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids}
        return model(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]


class SD3Family:
    """SD3/SD3.5: an MMDiT transformer predicting the flow velocity, flow-matching Euler steps."""

    name, denoiser_name, lora_prefix = "sd3", "transformer", "transformer"
    pipeline_name = "StableDiffusion3Pipeline"

    def load_kwargs(self, model) -> dict:
        return {} if model.t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def training_scheduler(self, scheduler):
        return scheduler  # the pipeline's FlowMatchEulerDiscreteScheduler (shift from its config)

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_MAX_LENGTH)
        return Conditioning(embeds, pooled)

    def negative(self, pipe, device: torch.device) -> Conditioning:
        return self.encode(pipe, [""], device)  # SD3's pipeline encodes "" (no zeroing)

    def scale_input(self, scheduler, latents, t):
        return latents

    def denoise(self, model, latents, t, cond: Conditioning, resolution: int) -> torch.Tensor:
        timestep = t.expand(latents.shape[0])
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.embeds,
                     pooled_projections=cond.pooled, return_dict=False)[0]

    def set_timesteps(self, pipe, num_steps: int, device: torch.device, latent_shape) -> None:
        scheduler, kwargs = pipe.scheduler, {}
        if scheduler.config.get("use_dynamic_shifting"):  # resolution-dependent shift, as StableDiffusion3Pipeline
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c, patch = scheduler.config, pipe.transformer.config.patch_size
            tokens = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
            kwargs["mu"] = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device=device, **kwargs)

    def step(self, scheduler, pred, t, latents, eta: float, variance_noise) -> torch.Tensor:
        """Euler (eta 0), or with eta > 0 Flow-GRPO's SDE step at noise level eta (grpo.sde_noise)."""
        if eta == 0:
            return scheduler.step(pred, t, latents).prev_sample
        mean, std, _ = sde_mean_std(scheduler, pred, t, latents, eta)
        return (mean + std * variance_noise.float()).to(latents.dtype)

    def policy_mean_std(self, scheduler, pred, t, latents, eta: float):
        """(mean, σ, std_dev_t): Flow-GRPO's KL term divides by std_dev_t², not by σ²."""
        return sde_mean_std(scheduler, pred, t, latents, eta)

    def last_step(self, scheduler, pred, t, latents, eta: float, variance_noise) -> torch.Tensor:
        scheduler._step_index = len(scheduler.timesteps) - 1  # the scheduler counts its steps: replay the last
        return scheduler.step(pred, t, latents).prev_sample

    def _sigma(self, scheduler, t, like: torch.Tensor) -> torch.Tensor:
        return scheduler.sigmas[scheduler.index_for_timestep(t)].to(like.device, like.dtype)

    def predict_x0(self, scheduler, pred, t, latents) -> torch.Tensor:
        return latents - self._sigma(scheduler, t, latents) * pred  # x_t = (1 − σ) x0 + σ ε, v = ε − x0

    def renoise(self, scheduler, x0, noise, t) -> torch.Tensor:
        sigma = self._sigma(scheduler, t, x0)
        return sigma * noise + (1 - sigma) * x0

    def noise_coefficients(self, scheduler, i: int, after: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 − σ, σ): x = (1 − σ) x0 + σ ε at step i's σ_i (`after`: σ_{i+1}, where Euler's step lands)."""
        sigma = scheduler.sigmas[i + 1 if after else i]
        return 1 - sigma, sigma

    def step_at(self, scheduler, pred, i: int, latents) -> torch.Tensor:
        scheduler._step_index = i  # the scheduler counts its steps: take step i, whatever came before
        return scheduler.step(pred, scheduler.timesteps[i], latents).prev_sample

    def call_kwargs(self, sampling) -> dict:
        return {"num_inference_steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale,
                "height": sampling.resolution, "width": sampling.resolution}


FAMILIES = {"sd": SDFamily(), "sdxl": SDXLFamily(), "sd3": SD3Family()}
PIPELINE_FAMILIES = {f.pipeline_name: name for name, f in FAMILIES.items()}  # model_index.json's _class_name → family


def pipeline_class(family):
    """The family's diffusers pipeline class (from_pretrained, save_lora_weights)."""
    import diffusers

    return getattr(diffusers, family.pipeline_name)


def get_family(name: str):
    if name not in FAMILIES:
        raise ValueError(f"model.family: got {name!r}; accepted: {', '.join(FAMILY_NAMES)}")
    return FAMILIES[name]


def family_of(pipe):
    """The family of a loaded pipeline (its class, or its components for a subclass)."""
    name = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if name is None:
        name = "sd3" if hasattr(pipe, "transformer") else "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"
    return FAMILIES[name]


def denoiser_of(pipe) -> torch.nn.Module:
    """The trainable network: the UNet (sd, sdxl) or the transformer (sd3)."""
    return getattr(pipe, family_of(pipe).denoiser_name)


def family_of_denoiser(module: torch.nn.Module):
    """sd3 for a transformer, sdxl for a UNet with SDXL's added conditioning, else sd."""
    if hasattr(module, "module"):  # a DeepSpeed engine
        module = module.module
    if type(module).__name__.endswith("Transformer2DModel"):
        return FAMILIES["sd3"]
    return FAMILIES["sdxl" if getattr(module.config, "addition_embed_type", None) == "text_time" else "sd"]
