"""Model loading: the tiny pipeline round-trips through a diffusers directory; LoRA save/load."""

from __future__ import annotations

import subprocess
import sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from alignprop.platform.config import LoraSection, ModelSection
from alignprop.platform.models import add_lora, build_tiny_pipeline, load_pipeline, save_lora
from conftest import subprocess_env


def render(pipe, seed=0):
    return pipe("a photo of a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def test_tiny_pipeline_is_deterministic_and_sd_shaped():
    a, b = build_tiny_pipeline(), build_tiny_pipeline()
    torch.testing.assert_close(render(a), render(b))
    assert render(a).shape == (1, 3, 32, 32)
    assert a.tokenizer("a cat").input_ids[0] == a.tokenizer.bos_token_id


def test_tiny_model_cli_saves_a_directory_that_loads_offline(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alignprop.platform.cli", "tiny-model", str(tmp_path / "tiny")],
                          env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    torch.testing.assert_close(render(loaded), render(build_tiny_pipeline()))
    # ... and through the config path users take (model.pretrained = local dir), frozen, DDIM.
    pipe = load_pipeline(ModelSection(pretrained=str(tmp_path / "tiny")))
    assert isinstance(pipe.scheduler, DDIMScheduler)  # DDIM (NaN-free at zero terminal SNR: trainers/families.py)
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


def test_lora_targets_config_modules_and_round_trips_as_safetensors(tmp_path):
    pipe = build_tiny_pipeline()
    params = add_lora(pipe.unet, LoraSection(rank=2, alpha=4, target_modules=["to_q", "to_v"]))
    names = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert names and all(".to_q." in n or ".to_v." in n for n in names) and len(params) == len(names)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    expected = render(pipe)
    path = save_lora(pipe.unet, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    fresh = build_tiny_pipeline()
    base = render(fresh)
    fresh.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(render(fresh), expected)
    assert (expected - base).abs().max() > 1e-4


def test_gaussian_lora_init_is_the_official_codes(tiny_pipe):
    """lora.init=gaussian (the default) is diffusers' LoRALinearLayer init that the official AlignProp
    code used (and TRL's init_lora_weights="gaussian"): down/A ~ N(0, std 1/rank), up/B = 0."""
    from alignprop.platform.config import LoraSection
    from alignprop.platform.models import add_lora, build_tiny_pipeline

    rank = 8
    add_lora(tiny_pipe.unet, LoraSection(rank=rank, alpha=rank, init="gaussian"))
    a = torch.cat([p.flatten() for n, p in tiny_pipe.unet.named_parameters() if "lora_A" in n])
    b = torch.cat([p.flatten() for n, p in tiny_pipe.unet.named_parameters() if "lora_B" in n])
    reference = torch.nn.init.normal_(torch.empty(a.numel()), std=1 / rank)  # LoRALinearLayer.__init__
    assert abs(a.std().item() - reference.std().item()) < 0.03 * reference.std().item() and abs(a.mean()) < 3e-3
    assert b.abs().max() == 0
    kaiming = build_tiny_pipeline()
    add_lora(kaiming.unet, LoraSection(rank=rank, alpha=rank, init="kaiming"))
    a_kaiming = torch.cat([p.flatten() for n, p in kaiming.unet.named_parameters() if "lora_A" in n])
    assert a_kaiming.std() < 0.7 * a.std(), "peft's default A is smaller at the tiny UNet's widths"
