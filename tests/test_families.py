"""Model families (trainers/families.py) on their tiny offline pipelines: SD 1.x-shaped, SDXL-shaped
(two text encoders, added conditioning) and SD3-shaped (MMDiT transformer, flow matching).

For each: the training sampler reproduces the family's own diffusers pipeline, gradients reach only
LoRA, the K window is the last K steps, a short DeepSpeed run raises a reward, and the LoRA artifact
loads into the family's pipeline class and changes its output."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from torch import nn

from alignprop.platform.config import ConfigError, LoraSection, ModelSection, load_config
from alignprop.platform.models import add_lora, build_tiny, load_pipeline, save_lora, save_tiny_pipeline
from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext
from alignprop.trainers.families import denoiser_of, family_of
from alignprop.trainers.sampling import SamplerSettings, encode_prompts, negative_prompt, sample

FAMILIES = ["sd", "sdxl", "sd3"]
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}
PRESETS = {"sd": "tiny-cpu", "sdxl": "tiny-sdxl-cpu", "sd3": "tiny-sd3-cpu"}
ETA = {"sd": 1.0, "sdxl": 1.0, "sd3": 0.0}  # flow matching: the deterministic Euler sampler
N, CPU = 6, torch.device("cpu")
PROMPTS = ["a cat", "a dog"]


class Recorder(nn.Module):
    """Wraps the denoiser; records, per forward call, whether autograd was recording."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.recording = model, [], True
        self.config = model.config

    def forward(self, *args, **kwargs):
        if self.recording:
            self.calls.append(torch.is_grad_enabled())
        return self.model(*args, **kwargs)


def with_lora(pipe, scale=0.05):
    model = denoiser_of(pipe)
    params = add_lora(model, LoraSection(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # lora_B starts at 0, which leaves lora_A without gradient
            p.data.normal_(0, scale)
    return params


def run(pipe, model, family, k, guidance=5.0, eta=None, seed=0, steps=N):
    embeds, negative = encode_prompts(pipe, PROMPTS, CPU), negative_prompt(pipe, len(PROMPTS), CPU)
    settings = SamplerSettings(steps, guidance, ETA[family] if eta is None else eta, 32)
    return sample(pipe, model, embeds, negative, torch.Generator().manual_seed(seed), settings, k=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_reproduces_the_familys_own_pipeline(family):
    """Without a graph, our sampler IS the family's diffusers pipeline (same latents, same scheduler
    steps, CFG, added conditioning, SD3's latent shift): the reference implementation agrees."""
    pipe = load_pipeline(ModelSection(tiny=True, family=family))
    assert type(pipe) is PIPELINES[family] and family_of(pipe).name == family
    with torch.no_grad():
        ours = run(pipe, denoiser_of(pipe), family, k=1, eta=0.0, steps=4).images
        theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_lora_through_the_last_k_steps(family):
    pipe = load_pipeline(ModelSection(tiny=True, family=family))
    params = with_lora(pipe)
    recorder = Recorder(denoiser_of(pipe))
    out = run(pipe, recorder, family, k=2)
    recorder.recording = False  # checkpoint recomputation during backward is not a sampling step
    assert recorder.calls == [i >= N - 2 for i in range(N)] and out.grad_steps == [N - 2, N - 1]
    out.images.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "every LoRA tensor gets a gradient"
    for part_name, part in pipe.components.items():
        for name, p in part.named_parameters() if isinstance(part, nn.Module) else ():
            assert "lora_" in name or p.grad is None, f"frozen {part_name}.{name} received a gradient"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_artifact_loads_into_the_familys_pipeline_and_changes_its_output(family, tmp_path):
    pipe = PIPELINES[family].from_pretrained(save_tiny_pipeline(tmp_path / "base", family), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def render(p):
        kwargs = {"eta": 0.0} if family != "sd3" else {}
        return p("a photo of a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **kwargs).images

    base = render(pipe)
    with_lora(pipe, scale=0.2)
    trained = render(pipe)
    path = save_lora(denoiser_of(pipe), tmp_path / "lora")
    fresh = PIPELINES[family].from_pretrained(tmp_path / "base", local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(path.parent))
    loaded = render(fresh)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    assert (loaded - base).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_short_run_raises_the_reward(family, deepspeed_world):
    """The recipe (real DeepSpeed engine) on the family's tiny CPU preset: brightness rises."""
    cfg = load_config(PRESETS[family], ["trainer.eval_every=0", "trainer.max_steps=8", "deepspeed.zero_stage=1",
                                         "trainer.eval_prompts=[a cat, a horse]", "sampling.num_steps=6",
                                         "truncation.k=6"])
    r = AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()
    assert family_of(r.pipe).name == family
    before = r.evaluate(0)["eval/brightness"]
    for step in range(8):
        r.train_step(step)
    after = r.evaluate(8)["eval/brightness"]
    assert after > before + 0.003, (before, after)


def test_family_is_read_from_the_pipeline_directory_and_checked(tmp_path):
    save_tiny_pipeline(tmp_path / "xl", "sdxl")
    cfg = load_config("tiny-cpu", ["model.tiny=false", f"model.pretrained={tmp_path / 'xl'}"])
    assert cfg.model.family == "auto" and type(load_pipeline(cfg.model)) is StableDiffusionXLPipeline
    with pytest.raises(ConfigError,
                       match=r"^model.family: got 'sd3' but .* is a sdxl pipeline; accepted: auto or sdxl$"):
        load_config("tiny-cpu", ["model.tiny=false", f"model.pretrained={tmp_path / 'xl'}", "model.family=sd3"])
    with pytest.raises(ConfigError, match=r"^model.family: got 'flux'; accepted: auto, sd, sdxl, sd3$"):
        load_config("tiny-cpu", ["model.family=flux"])
    with pytest.raises(ConfigError,
                       match=r"^sampling.eta: got 1.0 for an sd3 pipeline.*accepted: 0 "
                             r"\(grpo.s sampler noise on sd3 is grpo.sde_noise\)$"):
        load_config("tiny-sd3-cpu", ["sampling.eta=1.0"])
    with pytest.raises(ConfigError, match=r"^model.t5: "):
        load_config("tiny-sdxl-cpu", ["model.t5=false"])
    with pytest.raises(ConfigError, match=r"^lora.target_modules: 'add_q_proj' matches no module of the UNet"):
        load_config("tiny-sdxl-cpu", ["lora.target_modules=[to_q, add_q_proj]"])
    index = tmp_path / "xl" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError,
                       match=r"^model.pretrained: .* is a FluxPipeline; accepted: StableDiffusionPipeline, "):
        load_config("tiny-cpu", ["model.tiny=false", f"model.pretrained={tmp_path / 'xl'}"])


def test_sdxl_vae_stays_float32_under_float16_and_sd3_runs_without_t5():
    xl = load_pipeline(ModelSection(tiny=True, family="sdxl", dtype="float16"))
    assert xl.unet.dtype == torch.float16 and xl.vae.dtype == torch.float32  # force_upcast, as SDXL's pipeline
    no_t5 = load_pipeline(load_config("tiny-sd3-cpu", ["model.t5=false"]).model)
    assert no_t5.text_encoder_3 is None
    with_t5 = build_tiny("sd3")
    a, b = encode_prompts(no_t5, PROMPTS, CPU), encode_prompts(with_t5, PROMPTS, CPU)
    assert a.embeds.shape == b.embeds.shape and a.embeds[:, 77:].abs().max() == 0  # zeros in T5's place
    with torch.no_grad():
        assert run(no_t5, denoiser_of(no_t5), "sd3", k=1, steps=2).images.shape == (2, 3, 32, 32)


def test_soup_of_sd3_adapters_loads_into_its_pipeline(tmp_path):
    """`alignprop soup` keeps an adapter's component (transformer for sd3) in the metadata it writes."""
    from alignprop.platform.soup.mix import soup

    def trained(name, scale):
        pipe = build_tiny("sd3")
        with_lora(pipe, scale)
        save_lora(pipe.transformer, tmp_path / name)
        return pipe

    pipe_a, _ = trained("a", 0.2), trained("b", 0.4)
    mixed = soup([str(tmp_path / "a"), str(tmp_path / "b")], [1.0, 0.0], str(tmp_path / "mix"), mode="params")
    base = build_tiny("sd3")
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(str(mixed.parent))
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
    expected = pipe_a("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(base("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images, expected,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_alignprop_sample_uses_the_familys_pipeline_with_and_without_lora(family, tmp_path):
    from PIL import Image

    from alignprop.platform.sample import write_samples

    pipe = build_tiny(family)
    with_lora(pipe, scale=0.3)
    save_lora(denoiser_of(pipe), tmp_path / "lora")
    cfg = load_config(PRESETS[family], ["sampling.num_steps=3", "truncation.k=3"])
    base, lora = write_samples(cfg, ["a cat"], str(tmp_path / "out"), str(tmp_path / "lora"))
    pixels = [torch.tensor(list(Image.open(p).getdata()), dtype=torch.float32) for p in (base, lora)]
    assert (pixels[0] - pixels[1]).abs().max() > 2


@pytest.mark.slow
def test_bench_runs_on_the_flow_matching_family(capsys):
    from alignprop.platform.bench.steps import run_bench

    for family in ("sd3",):  # the sdxl path is the same code (its bench table is in NOTES.md)
        cfg = load_config(PRESETS[family], ["sampling.num_steps=1", "truncation.k=1", "trainer.batch_size=1"])
        rows = run_bench(cfg,
                         steps=1, modes=["auto"])  # all/none/auto cells: tests/test_bench.py
        assert [(r["k"], r["checkpoint"], r["kept"]) for r in rows] == [(1, "auto", 1)]
        assert all(r["s_per_step"] > 0 and r["peak_mb"] > 0 and r["unet_tflop_per_step"] > 0 for r in rows)
        assert f"({family}): N=1" in capsys.readouterr().out


@pytest.mark.slow
def test_mlflow_model_of_an_sd3_run_predicts_with_its_lora(tmp_path):
    """The run's MLflow Model rebuilds the SD3 pipeline from the run's config and loads the adapter."""
    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    import mlflow
    from alignprop.platform.config import to_yaml
    from alignprop.platform.mlflow_model import decode_image, log_run_model, mlflow_uris
    from test_mlflow_model import same_image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sd3", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    cfg = load_config("tiny-sd3-cpu", ["sampling.num_steps=3", "truncation.k=3"])
    pipe = load_pipeline(cfg.model)
    with_lora(pipe, scale=0.3)
    save_lora(pipe.transformer, tmp_path / "lora")
    client.log_artifacts(run_id, str(tmp_path / "lora"), "lora/final")
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    model_uri = log_run_model(uri, run_id)
    with mlflow_uris(uri):
        out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"prompt": ["a cat"]}))
    s = cfg.sampling
    expected = pipe("a cat", num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, height=s.resolution,
                    width=s.resolution, generator=torch.Generator().manual_seed(0)).images[0]
    assert same_image(np.asarray(decode_image(out.image[0])), np.asarray(expected))  # folded vs wrapped LoRA
