"""Models: the diffusion pipeline a run trains and the LoRA on its denoiser (the UNet of sd/sdxl, the
transformer of sd3; trainers/families.py).

| module | holds |
|---|---|
| `pipelines.py` | `load_pipeline` (hub id, local dir, `toy-world`, tiny, full-size), family detection, LoRA targets |
| `lora.py` | `add_lora`, `save_lora` (diffusers' format, rank/alpha metadata), `adapters_disabled`, `LoraFold` |
| `tiny.py`, `tiny_families.py` | tiny offline pipelines of each family (random, seeded weights) |
| `full_size.py` | the published SD 1.5 / SD 2.1 architectures with random weights (`model.arch`) |

    pipe = load_pipeline(cfg.model, device)
    params = add_lora(denoiser(pipe), cfg.lora)
    alignprop tiny-model /tmp/tiny-sd [--family sdxl|sd3]
"""

from .lora import (LORA_WEIGHTS_NAME, LoraFold, adapters_disabled, add_lora, lora_delta_norm, lora_scaled,
                   lora_state_dict, save_lora, set_pipeline_lora_scale)
from .pipelines import (DTYPES, TOY_WORLD_MODEL, denoiser_module_names, load_pipeline, lora_parameter_count, model_path,
                        pretrained_family, resolve_family)
from .tiny import TINY_SEED, build_tiny, build_tiny_pipeline, build_tiny_tokenizer, cast_modules, save_tiny_pipeline

__all__ = ["DTYPES", "LORA_WEIGHTS_NAME", "LoraFold", "TINY_SEED", "TOY_WORLD_MODEL", "adapters_disabled", "add_lora",
           "build_tiny", "build_tiny_pipeline",
           "build_tiny_tokenizer", "cast_modules", "denoiser_module_names", "load_pipeline", "lora_parameter_count",
           "lora_delta_norm", "lora_scaled", "lora_state_dict", "set_pipeline_lora_scale",
           "model_path", "pretrained_family", "resolve_family", "save_lora", "save_tiny_pipeline"]
