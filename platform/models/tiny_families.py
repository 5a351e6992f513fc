"""Tiny offline SDXL- and SD3-shaped pipelines (random, seeded weights; no download), the siblings of
`models.build_tiny_pipeline` for tests, `tiny-sdxl-cpu`, `tiny-sd3-cpu` and `alignprop bench`.

    alignprop tiny-model /tmp/tiny-sdxl --family sdxl
    StableDiffusionXLPipeline.from_pretrained("/tmp/tiny-sdxl", local_files_only=True)

Shapes follow diffusers' own tiny test pipelines (tests/pipelines/stable_diffusion_xl,
tests/pipelines/stable_diffusion_3), with the byte-level CLIP tokenizer of the tiny SD pipeline
and, for SD3's optional T5, a random T5 encoder with ByT5's byte tokenizer (needs no vocabulary file).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel)

TEXT_DIM = 32  # each tiny CLIP's hidden size (SDXL concatenates two: 64)


def _clip_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(**extra) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32, **extra,
    )


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,  # 6 time ids × 8 + the pooled text
        cross_attention_dim=2 * TEXT_DIM, norm_num_groups=32,
    )


def tiny_sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=2 * TEXT_DIM,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=32,
    )


def build_tiny_sdxl_pipeline(tokenizer, seed: int) -> StableDiffusionXLPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_sdxl_unet()
        vae = _tiny_vae(force_upcast=True)
        text_encoder = CLIPTextModel(_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
    scheduler = DDIMScheduler(  # SDXL base's betas
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd3_pipeline(tokenizer, seed: int, t5: bool = True) -> StableDiffusion3Pipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_sd3_transformer()
        vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)  # SD3's VAE latent shift and scale
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=384, d_model=2 * TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0,
        )) if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's shift
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=ByT5Tokenizer() if t5 else None,
    )
