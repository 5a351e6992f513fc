"""An exponential moving average of the LoRA weights (`trainer.ema_decay`), evaluated (`eval_ema/…`)
and saved (`lora/final_ema`) beside the raw weights, checkpointed as safetensors.

    ema = LoraEMA(0.999, recipe.lora_parameters())
    ema.update(recipe.lora_parameters())       # after each optimizer step
    with ema.swapped_in(recipe.lora_parameters()):
        ...                                    # the denoiser runs with the averaged adapter
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

EMA_FILE = "lora_ema.safetensors"
NamedParams = Sequence[tuple[str, torch.Tensor]]


class LoraEMA:
    def __init__(self, decay: float, named_params: NamedParams):
        self.decay = decay
        self.weights = {n: p.detach().clone().float() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params: NamedParams) -> None:
        for name, p in named_params:
            self.weights[name].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextmanager
    def swapped_in(self, named_params: NamedParams):
        """The EMA weights in the LoRA layers for the block; the raw ones restored after it."""
        params = dict(named_params)
        raw = {n: p.detach().clone() for n, p in params.items()}
        for name, p in params.items():
            p.data.copy_(self.weights[name])
        try:
            yield
        finally:
            for name, p in params.items():
                p.data.copy_(raw[name])

    def save(self, directory: Path) -> None:
        save_file({n: t.cpu().contiguous() for n, t in self.weights.items()}, str(Path(directory) / EMA_FILE))

    def load(self, directory: Path, device: torch.device) -> None:
        """From a checkpoint directory, if it has one (a run that turned EMA on later has not)."""
        path = Path(directory) / EMA_FILE
        if path.exists():
            self.weights = {n: t.to(device) for n, t in load_file(str(path)).items()}
