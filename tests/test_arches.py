"""platform/models/full_size.py: the published SD 1.5 / SD 2.1 architectures with random weights, offline."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from alignprop.platform.models.full_size import (
    ARCH_NAMES,
    arch_configs,
    arch_denoiser_config,
    build_arch_pipeline,
    build_arch_tokenizer,
)

# Parameter counts of the published checkpoints' components. SD 1.5: 859,520,964 is the UNet count in
# diffusers' ModelMixin.num_parameters docstring (from_pretrained("stable-diffusion-v1-5/...", subfolder=
# "unet")); 83,653,863 (VAE) and 123,060,480 (CLIP ViT-L/14 text model) are the counts widely printed
# from the loaded checkpoint. SD 2.1: 865,910,724 (UNet) and 340,387,840 (OpenCLIP ViT-H text model,
# 23 layers) are the flat weight sizes of stabilityai/stable-diffusion-2-1 in buddy-mlir's SD 2.1
# example; its VAE has SD 1.5's architecture. The rounded figures: 859.5M / 83.7M / 123.1M, 865.9M / 340.4M.
PUBLISHED_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_component_parameter_counts_equal_the_published_checkpoints(arch):
    configs = arch_configs(arch)
    with torch.device("meta"):  # shapes only: no memory, no init time
        built = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    assert {name: numel(m) for name, m in built.items()} == PUBLISHED_PARAMS[arch]
    assert arch_denoiser_config(arch) == configs["unet"]


def test_key_published_config_values():
    sd15, sd21 = arch_configs("sd15"), arch_configs("sd21")
    for c in (sd15, sd21):
        assert c["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
        assert c["unet"]["layers_per_block"] == 2
        assert c["vae"]["block_out_channels"] == [128, 256, 512, 512]
        assert c["vae"]["scaling_factor"] == 0.18215
        assert c["text_encoder"]["vocab_size"] == 49408
        assert c["text_encoder"]["max_position_embeddings"] == 77
        assert c["scheduler"]["beta_schedule"] == "scaled_linear"
        assert (c["scheduler"]["beta_start"], c["scheduler"]["beta_end"]) == (0.00085, 0.012)
        assert c["scheduler"]["steps_offset"] == 1 and c["scheduler"]["set_alpha_to_one"] is False
    # SD 1.5: CLIP ViT-L/14 text model, 512px (64 latents), epsilon
    assert sd15["unet"]["cross_attention_dim"] == 768
    assert sd15["unet"]["attention_head_dim"] == 8
    assert sd15["unet"]["use_linear_projection"] is False and sd15["unet"]["upcast_attention"] is False
    assert sd15["unet"]["sample_size"] == 64
    assert (sd15["text_encoder"]["hidden_size"], sd15["text_encoder"]["num_hidden_layers"]) == (768, 12)
    assert sd15["text_encoder"]["hidden_act"] == "quick_gelu"
    assert sd15["scheduler"]["prediction_type"] == "epsilon"
    # SD 2.1 (768-v): OpenCLIP ViT-H text model (23 layers), 768px (96 latents), v-prediction
    assert sd21["unet"]["cross_attention_dim"] == 1024
    assert sd21["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert sd21["unet"]["use_linear_projection"] is True and sd21["unet"]["upcast_attention"] is True
    assert sd21["unet"]["sample_size"] == 96
    assert (sd21["text_encoder"]["hidden_size"], sd21["text_encoder"]["num_hidden_layers"]) == (1024, 23)
    assert (sd21["text_encoder"]["num_attention_heads"], sd21["text_encoder"]["intermediate_size"]) == (16, 4096)
    assert sd21["text_encoder"]["hidden_act"] == "gelu"
    assert sd21["scheduler"]["prediction_type"] == "v_prediction"
    # the DDIM scheduler the pipeline gets keeps the published values
    ddim = DDIMScheduler.from_config(sd21["scheduler"])
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.steps_offset == 1
    # plain dicts, fresh each call
    sd15["unet"]["block_out_channels"].append(0)
    assert arch_configs("sd15")["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    with pytest.raises(ValueError, match="sd15, sd21"):
        arch_configs("sdxl")


@pytest.mark.parametrize("arch, pad_id", [("sd15", 49407), ("sd21", 0)])
def test_offline_tokenizer_has_clips_size_and_special_ids(arch, pad_id, tmp_path):
    tok = build_arch_tokenizer(arch)
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    assert tok.model_max_length == 77
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406
    n = ids.index(49407)  # the first eos ends the prompt; padding follows
    assert 1 < n < 76 and ids[n + 1:] == [pad_id] * (76 - n)
    assert max(ids[1:n]) < 512  # byte-level: every prompt token is a byte symbol
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # it survives save_pretrained → from_pretrained, as inside a saved pipeline
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(again) == 49408 and again.pad_token_id == pad_id
    assert again("a photo of a cat", padding="max_length", max_length=77).input_ids == ids


@pytest.fixture(scope="module")
def sd15_pipe():
    """One real full-size build: ~6 s on 2 CPU cores, 4.3 GB of fp32 weights."""
    rng = torch.get_rng_state()
    pipe = build_arch_pipeline("sd15", seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
    return pipe


def sd15_modules(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


@pytest.mark.slow
def test_sd15_build_round_trips_through_save_pretrained(sd15_pipe, tmp_path):
    """The full-size pipeline saved as safetensors (4 GB, ~10 s) loads back offline with the same UNet
    output at 8×8 latents, bit for bit."""
    pipe = sd15_pipe
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert not any(m.training for m in sd15_modules(pipe).values())
    assert {name: numel(m) for name, m in sd15_modules(pipe).items()} == PUBLISHED_PARAMS["sd15"]
    assert pipe.tokenizer.pad_token_id == 49407 and len(pipe.tokenizer) == 49408

    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        expected = pipe.unet(latents, 500, encoder_hidden_states=context).sample
    assert expected.shape == (1, 4, 8, 8) and torch.isfinite(expected).all()

    pipe.save_pretrained(tmp_path / "sd15", safe_serialization=True)
    assert (tmp_path / "sd15" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15", local_files_only=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.tokenizer.pad_token_id == 49407 and len(loaded.tokenizer) == 49408
    with torch.no_grad():
        actual = loaded.unet(latents, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    shutil.rmtree(tmp_path / "sd15")  # pytest keeps the last runs' tmp_path: don't leave 4 GB in each


@pytest.mark.slow
def test_sd15_weights_are_a_function_of_the_seed(sd15_pipe):
    """Every worker that builds model.arch agrees on the weights (~6 s)."""
    again = build_arch_pipeline("sd15", seed=0)
    for name, module in sd15_modules(sd15_pipe).items():
        other = dict(getattr(again, name).named_parameters())
        assert all(torch.equal(p, other[n]) for n, p in module.named_parameters()), name


@pytest.mark.slow
def test_one_alignprop_step_with_the_sd15_sized_unet_through_the_recipe(deepspeed_world):
    """The real recipe at real size, small resolution: model.arch=sd15 built offline, LoRA on the
    860M-parameter UNet, every window call checkpointed, DeepSpeed ZeRO-2: one step moves the LoRA
    and nothing else (≈ 1 min on 2 CPU cores)."""
    from alignprop.platform.config import load_config
    from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext

    cfg = load_config("tiny-cpu", ["model.tiny=false", "model.arch=sd15", "sampling.resolution=64",
                                   "sampling.num_steps=2",
                                   "truncation.k=1", "trainer.batch_size=1", "deepspeed.zero_stage=2",
                                   "trainer.eval_every=0",
                                   "sampling.checkpoint_unet=all"])
    r = AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()
    assert r.engine.zero_optimization_stage() == 2 and numel(r.denoiser) > PUBLISHED_PARAMS["sd15"]["unet"]
    frozen = {n: p.detach().clone() for n,
              p in r.denoiser.named_parameters() if "lora_" not in n and "down_blocks.0" in n}
    lora = {n: p.detach().clone() for n, p in r.lora_parameters()}
    m = r.train_step(0)
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
    assert m["unet_evals"] == (2 + 1) * 2, "N steps + the checkpointed window call, each with CFG"
    now = dict(r.denoiser.named_parameters())
    assert any(not torch.equal(now[n], p) for n, p in lora.items() if "lora_B" in n), "lora_B moved"
    assert all(torch.equal(now[n], p) for n, p in frozen.items()), "frozen weights untouched"
