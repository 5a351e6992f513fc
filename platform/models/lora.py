"""LoRA on the denoiser (the UNet of sd/sdxl, the transformer of sd3): attach a trainable adapter and
write it in diffusers' format, loadable by the family's `pipe.load_lora_weights(directory)`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ...trainers.families import family_of_denoiser, pipeline_class

if TYPE_CHECKING:
    from ..config import LoraSection


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, lora: "LoraSection") -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA adapter (fp32) to the frozen denoiser (UNet or transformer); returns
    its parameters."""
    unet.add_adapter(LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout, init_lora_weights="gaussian" if lora.init == "gaussian" else True,
    ))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' key format, ready for `save_lora_weights` (a UNet's keys converted
    as diffusers' SD/SDXL LoRA scripts do; a transformer's as peft gives them, as its SD3 script)."""
    state = get_peft_model_state_dict(unet)
    if family_of_denoiser(unet).denoiser_name == "unet":
        state = convert_state_dict_to_diffusers(state)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(unet: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write `pytorch_lora_weights.safetensors`, loadable by the family's pipeline:
    `pipe.load_lora_weights(directory)` (StableDiffusion[XL|3]Pipeline)."""
    family = family_of_denoiser(unet)
    prefix = family.lora_prefix
    pipeline_class(family).save_lora_weights(directory, safe_serialization=True, **{
        f"{prefix}_lora_layers": lora_state_dict(unet),
        # rank/alpha/targets in the safetensors metadata: without it a loader assumes alpha = rank
        f"{prefix}_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    })
    return Path(directory) / LORA_WEIGHTS_NAME


@torch.no_grad()
def lora_delta_norm(unet: torch.nn.Module) -> float:
    """Σ over the adapted layers of ‖scaling · B·A‖_F: how far the LoRA moved the denoiser's weights
    (0 at initialisation, where B = 0). A disabled adapter (`disable_adapters`) counts nothing."""
    total = 0.0
    for module in unet.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or getattr(module, "disable_adapters", False):
            continue
        for name in getattr(module, "active_adapters", list(lora_a)):
            if name in lora_a and name in lora_b:
                a, b = lora_a[name].weight.float(), lora_b[name].weight.float()
                total += float(module.scaling[name] * (b.flatten(1) @ a.flatten(1)).norm())
    return total


@contextmanager
def lora_scaled(denoiser: torch.nn.Module, scale: float):
    """The adapter at `scale` × its trained strength inside the block (every LoRA layer's scaling, as
    diffusers' `set_adapters(..., weights=scale)`), then as it was. Scale 0 is the base model exactly."""
    layers = [(m, dict(m.scaling)) for m in denoiser.modules() if isinstance(getattr(m, "scaling", None), dict)]
    for module, original in layers:
        module.scaling.update({name: value * scale for name, value in original.items()})
    try:
        yield denoiser
    finally:
        for module, original in layers:
            module.scaling.update(original)


def set_pipeline_lora_scale(pipe, scale: float) -> None:
    """A pipeline with a loaded LoRA (`load_lora_weights`) samples with it at `scale` (diffusers' set_adapters)."""
    names = pipe.get_active_adapters()
    pipe.set_adapters(names, adapter_weights=[scale] * len(names))


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """The base model inside the block: the LoRA adapter switched off (diffusers' `disable_adapters`),
    then on again, also after an error (GRPO's reference policy, the base-model evaluations)."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


class LoraFold:
    """`perf.lora_prefix: fold`: inside `folded()`, every LoRA layer of the denoiser runs as its base layer
    with W + s·B·A in place of W (peft's `merge`), so a call that needs no gradient costs what the bare
    model costs (no extra kernels per wrapped layer); on leaving, each W is restored bit for bit from an
    untouched copy taken at the first fold (never by subtraction: no drift over thousands of folds).
    The LoRA weights are read when folding: fold after each optimizer step, never across one.

        fold = LoraFold(denoiser)
        with torch.no_grad(), fold.folded():      # the prefix, evaluation, DDPO/GRPO sampling
            ...
    A no-op (the wrapped layers run) while the adapter is disabled, and for a denoiser in training mode
    whose LoRA has dropout (the wrapped layers would drop, the folded weights cannot)."""

    def __init__(self, denoiser: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.denoiser = denoiser
        self.layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer) and len(m.lora_A)]
        self.originals: list[torch.Tensor] = []
        self.active = False

    def _applies(self) -> bool:
        if not self.layers or self.active or any(layer.disable_adapters for layer in self.layers):
            return False
        dropout = any(p.p > 0 for layer in self.layers for p in layer.lora_dropout.values()
                      if isinstance(p, torch.nn.Dropout))
        return not (dropout and self.denoiser.training)

    @contextmanager
    def folded(self):
        if not self._applies():
            yield self.denoiser
            return
        with torch.no_grad():
            if not self.originals:
                self.originals = [layer.get_base_layer().weight.detach().clone() for layer in self.layers]
            self.active = True
            try:
                for layer in self.layers:
                    layer.merge()
                yield self.denoiser
            finally:
                self._restore()

    def _restore(self) -> None:
        for layer, original in zip(self.layers, self.originals):
            if layer.merged:
                layer.unmerge()  # peft's bookkeeping; the weight it leaves is overwritten with the copy
            layer.get_base_layer().weight.copy_(original)
        self.active = False
