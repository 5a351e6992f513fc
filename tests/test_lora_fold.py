"""`perf.lora_prefix: fold` (platform/models/lora.py `LoraFold`): the calls that need no gradient run with
W + s·B·A folded into the base weights. The same images as the wrapped layers within fp32's rounding on
every family's tiny pipeline, the same gradients through the window, base weights restored bit for bit
after 100 folds with the LoRA changing in between, and no LoRA kernel runs while folded."""

from __future__ import annotations

import pytest
import torch

from alignprop.platform.config import ConfigError, ModelSection, load_config
from alignprop.platform.models import LoraFold, adapters_disabled, load_pipeline, lora_scaled
from alignprop.trainers.families import denoiser_of
from alignprop.trainers.sampling import SamplerSettings, encode_prompts, negative_prompt, sample

from test_families import ETA, FAMILIES, PROMPTS, with_lora

N, CPU = 6, torch.device("cpu")


def images(pipe, family, fold, k=2, grad=False, **options):
    embeds, negative = encode_prompts(pipe, PROMPTS, CPU), negative_prompt(pipe, len(PROMPTS), CPU)
    settings = SamplerSettings(N, 5.0, ETA[family], 32)
    with torch.set_grad_enabled(grad):
        return sample(pipe, denoiser_of(pipe), embeds, negative, torch.Generator().manual_seed(0), settings, k=k,
                      fold=fold, **options)


def lora_calls(model) -> list[int]:
    """A counter of the LoRA A-matrix forwards (the wrapped layers' extra kernels) while it is attached."""
    calls = [0]
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_sampling_gives_the_wrapped_images_and_runs_no_lora_kernel(family):
    pipe = load_pipeline(ModelSection(tiny=True, family=family))
    with_lora(pipe, scale=0.2)
    model = denoiser_of(pipe)
    fold, calls = LoraFold(model), lora_calls(model)
    wrapped = images(pipe, family, None).images
    assert calls[0] > 0
    calls[0] = 0
    folded = images(pipe, family, fold).images
    assert calls[0] == 0, "no wrapped LoRA layer runs in a folded evaluation"
    assert float((folded - wrapped).abs().max()) <= 1e-5
    base = load_pipeline(ModelSection(tiny=True, family=family))
    assert float((images(base, family, None).images - wrapped).abs().max()) > 1e-3, "the LoRA changes the images"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_window_keeps_the_wrapped_layers_and_their_gradients(family):
    pipe = load_pipeline(ModelSection(tiny=True, family=family))
    params = with_lora(pipe, scale=0.2)
    model = denoiser_of(pipe)
    grads = {}
    for fold in (None, LoraFold(model)):
        calls = lora_calls(model) if fold is not None else [None]
        out = images(pipe, family, fold, k=2, grad=True, checkpoint_unet="none")
        if fold is not None:  # 2 window steps × guidance's one batched call, over every adapted layer
            assert calls[0] == 2 * len(fold.layers)
        out.images.mean().backward()
        grads[fold is None] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    for wrapped, folded in zip(grads[True], grads[False]):
        assert float((wrapped - folded).norm()) <= 1e-4 * float(wrapped.norm()) + 1e-9


def test_base_weights_are_bitwise_restored_after_100_folds_while_the_lora_changes():
    pipe = load_pipeline(ModelSection(tiny=True))
    params = with_lora(pipe, scale=0.2)
    model = denoiser_of(pipe)
    fold = LoraFold(model)
    before = [layer.get_base_layer().weight.clone() for layer in fold.layers]
    x = torch.randn(2, model.config.in_channels, 8, 8)
    t, text = torch.tensor(500), torch.randn(2, 4, model.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(1)
    for cycle in range(100):
        with torch.no_grad():
            for p in params:  # an optimizer step between folds
                p.add_(torch.randn(p.shape, generator=generator), alpha=1e-2)
            wrapped = model(x, t, text).sample
            with fold.folded():
                folded = model(x, t, text).sample
        assert float((folded - wrapped).abs().max()) <= 1e-4 * float(wrapped.abs().max())
    assert all(torch.equal(b, layer.get_base_layer().weight) for b, layer in zip(before, fold.layers))
    assert not any(layer.merged for layer in fold.layers)


def test_fold_follows_the_lora_scale_and_is_a_no_op_with_the_adapter_off():
    pipe = load_pipeline(ModelSection(tiny=True))
    with_lora(pipe, scale=0.2)
    model = denoiser_of(pipe)
    fold = LoraFold(model)
    with lora_scaled(model, 0.5):
        half = images(pipe, "sd", None).images
        half_folded = images(pipe, "sd", fold).images
    assert float((half - half_folded).abs().max()) <= 1e-5
    with adapters_disabled(model):
        base = images(pipe, "sd", None).images
        base_folded = images(pipe, "sd", fold).images
    assert torch.equal(base, base_folded)
    with torch.no_grad():  # an error inside the block restores the weights too
        before = [layer.get_base_layer().weight.clone() for layer in fold.layers]
        with pytest.raises(RuntimeError, match="inside"):
            with fold.folded():
                raise RuntimeError("inside")
        assert all(torch.equal(b, layer.get_base_layer().weight) for b, layer in zip(before, fold.layers))


def test_lora_prefix_is_checked_in_one_line():
    assert load_config("tiny-cpu").perf.lora_prefix == "fold"
    with pytest.raises(ConfigError, match=r"perf\.lora_prefix: got 'merged'; accepted: fold, wrapped"):
        load_config("tiny-cpu", ["perf.lora_prefix=merged"])
