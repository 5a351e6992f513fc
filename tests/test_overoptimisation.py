"""The over-optimisation panel (issue 23), exact on constructed cases: the judge's shape and background,
gold metrics on the proxy's scale, proxy error, ΔW norm, diversity, and selection on `trainer.best_metric`."""

from __future__ import annotations

import math

import pytest
import torch

from alignprop.platform.config import ConfigError, load_config
from alignprop.platform.toy_world import HELDOUT_CAPTIONS, TRAIN_CAPTIONS, all_captions, batch
from alignprop.platform.toy_world.judge import judge
from alignprop.rewards import build_reward, build_rewards
from alignprop.rewards.toy import proxy_errors
from alignprop.trainers.metrics import diversity


def pixels(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_the_judge_reads_shape_and_background_of_every_rendered_caption():
    scenes, images = batch(0, 600, all_captions())
    verdict = judge(pixels(images))
    assert verdict.shape == [s.caption_.shape for s in scenes]
    assert verdict.background == [s.background for s in scenes]
    assert judge(torch.ones(1, 3, 32, 32)).shape == [None]


def test_gold_rewards_score_what_the_prompt_asks_on_the_proxys_scale():
    scenes, images = batch(5, 32, TRAIN_CAPTIONS + HELDOUT_CAPTIONS)
    x, prompts = pixels(images), [s.caption for s in scenes]
    gold = build_reward({"name": "toy_count_judge", "target": 2})
    assert gold(x, prompts).tolist() == [-float(abs(s.count - 2)) for s in scenes]  # −|judge count − target|
    assert build_reward({"name": "toy_count_judge"})(x, prompts).tolist() == [0.0] * 32  # the prompt's count
    assert build_reward({"name": "toy_shape_match"})(x, prompts).tolist() == [1.0] * 32
    assert build_reward({"name": "toy_background_match"})(x, prompts).tolist() == [1.0] * 32
    squares = build_reward({"name": "toy_shape_match", "shape": "square"})
    assert squares(x, prompts).tolist() == [float(s.caption_.shape == "square") for s in scenes]
    loose = [f"some {s.caption_.shape}s" for s in scenes]  # a prompt outside the grammar: the word is found
    assert build_reward({"name": "toy_shape_match"})(x, loose).tolist() == [1.0] * 32
    with pytest.raises(ValueError, match="names no background"):
        build_reward({"name": "toy_background_match"})(x[:1], ["a cat"])


def test_proxy_error_is_zero_where_the_soft_count_equals_the_judges_and_the_gap_otherwise():
    rewards = build_rewards([{"name": "toy_count", "target": 1}])
    net = rewards.rewards[0].net
    with torch.no_grad():  # a count CNN whose density is 1/256 in each of its 16×16 cells: soft count 1
        for p in net.parameters():
            p.zero_()
        net.body[-1].bias.fill_(math.log(math.expm1(1 / 256)))
    scenes, images = batch(7, 64, all_captions())
    counts = torch.tensor([s.count for s in scenes], dtype=torch.float32)
    gold = build_rewards([{"name": "toy_count_exact", "target": 1}])
    got = proxy_errors(rewards, gold, pixels(images))
    assert got["proxy_error"] == pytest.approx(float((counts - 1).abs().mean()), abs=1e-5)
    ones = [i for i, s in enumerate(scenes) if s.count == 1]
    assert proxy_errors(rewards, gold, pixels(images[ones]))["proxy_error"] == pytest.approx(0.0, abs=1e-5)
    assert proxy_errors(rewards, None, pixels(images)) == {}, "no judge configured: nothing to compare"


def test_diversity_is_zero_for_identical_samples_and_the_rms_distance_otherwise():
    same = torch.rand(3, 1, 3, 8, 8).expand(3, 2, 3, 8, 8)
    assert diversity(same) == 0.0
    black_white = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])[None]
    assert diversity(black_white) == pytest.approx(1.0)
    three = torch.stack([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5)])[None]
    assert diversity(three) == pytest.approx((0 + 0.5 + 0.5) / 3)  # the mean over the 3 pairs


def test_lora_delta_norm_is_zero_at_the_base_and_the_scaled_product_norm_after():
    from alignprop.platform.config import LoraSection, ModelSection
    from alignprop.platform.models import add_lora, load_pipeline, lora_delta_norm

    unet = load_pipeline(ModelSection(tiny=True)).unet
    add_lora(unet, LoraSection(rank=2, alpha=4.0))
    assert lora_delta_norm(unet) == 0.0, "B = 0 at initialisation"
    layer = next(m for m in unet.modules() if hasattr(m, "lora_B") and "default" in m.lora_B)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.scaling["default"] == 2.0
    assert lora_delta_norm(unet) == pytest.approx(float(2.0 * (b @ a).detach().norm()), rel=1e-6)


def test_best_metric_is_checked_and_defaults_tunes_metric(tmp_path):
    from alignprop.platform.sweeps.space import load_space

    with pytest.raises(ConfigError, match=r"trainer\.best_metric: got 'eval/nope'; accepted: eval/reward_total, "):
        load_config("toy-count", ["trainer.best_metric=eval/nope"])
    cfg = load_config("toy-count")
    assert cfg.trainer.best_metric == "eval/toy_count_judge"
    stopping = load_config("toy-count", ["trainer.early_stop_metric=best"]).trainer.early_stop_metric
    assert stopping == cfg.trainer.best_metric, "early stopping on `best`: the metric lora/best is chosen on"
    (tmp_path / "lr.yaml").write_text("space:\n  optim.lr: {space: choice, categories: [0.001, 0.01]}\n")
    assert load_space(str(tmp_path / "lr.yaml"), cfg).metric == "eval/toy_count_judge", "no metric: the run's"


def test_best_metric_decides_which_evaluation_becomes_lora_best(deepspeed_world, tmp_path):
    """Darkening raises eval/reward_total (−brightness) at every evaluation while the held-out brightness
    falls: on the default metric lora/best is a trained LoRA, on the held-out one the base's (B = 0, step 0)."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from safetensors.torch import load_file

    from alignprop.platform.models import LORA_WEIGHTS_NAME
    from alignprop.platform.tracking import open_run
    from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    chosen = {}
    for best in ("eval/reward_total", "eval/bright"):
        run_id = open_run(uri, "best", f"best-{best[5:]}", {}, "")
        cfg = load_config("tiny-cpu", ["trainer.max_steps=3", "trainer.eval_every=1", "trainer.eval_prompts=[a cat]",
                                       "rewards=[{name: brightness, weight: -1.0}]", "optim.lr=0.05",
                                       "eval_rewards=[{name: brightness, label: bright}]",
                                       f"trainer.best_metric={best}"])
        recipe = AlignPropRecipe(cfg, WorkerContext(progress=False, tracking_uri=uri, run_id=run_id)).setup()
        recipe.train()
        history = {k: [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, k), key=lambda m: m.step)]
                   for k in ("eval/reward_total", "eval/bright")}
        total, bright = history["eval/reward_total"], history["eval/bright"]
        assert max(total) > total[0] and max(bright) == bright[0], history  # darker after step 0, brighter never
        path = download_artifacts(run_id=run_id, artifact_path="lora/best", dst_path=str(tmp_path / best[5:]),
                                  tracking_uri=uri)
        weights = load_file(f"{path}/{LORA_WEIGHTS_NAME}")
        lora_b = [k for k in weights if "lora_B" in k or "lora.up" in k]
        chosen[best] = lora_b and any(weights[k].any() for k in lora_b)  # B ≠ 0: a trained adapter
    assert chosen == {"eval/reward_total": True, "eval/bright": False}, "trained on the default, the base on bright"


def perturbed_lora(model, scale=0.05):
    """A LoRA whose B is no longer 0: the adapted model differs from the base."""
    from alignprop.platform.config import LoraSection
    from alignprop.platform.models import add_lora

    params = add_lora(model, LoraSection(rank=4, alpha=4))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, scale)
    return params


@pytest.mark.parametrize("family, eta", [("sd", 0.0), ("sd", 1.0), ("sd3", 0.0)])
@pytest.mark.parametrize("moved", [False, True])
def test_kl_terms_vanish_with_their_gradient_at_the_base_and_not_after(family, eta, moved):
    """optim.kl_coef's term: 0 and a zero gradient at the base model (B = 0); positive with a gradient once
    the LoRA moved. eta 0 and sd3's Euler: the squared prediction difference; eta 1: the Gaussian KL."""
    from alignprop.platform.config import LoraSection
    from alignprop.platform.models import add_lora, build_tiny
    from alignprop.trainers.families import denoiser_of
    from alignprop.trainers.sampling import SamplerSettings, encode_prompts, negative_prompt, sample

    pipe = build_tiny(family)
    model = denoiser_of(pipe)
    params = perturbed_lora(model) if moved else add_lora(model, LoraSection(rank=4, alpha=4))
    cond, negative = encode_prompts(pipe, ["a cat", "a dog"], torch.device("cpu")), negative_prompt(pipe, 2, "cpu")
    kl_terms = []
    sample(pipe, model, cond, negative, torch.Generator().manual_seed(0), SamplerSettings(4, 5.0, eta, 32), k=2,
           kl_terms=kl_terms)
    assert len(kl_terms) == 2 and all(term.shape == (2,) for term in kl_terms)
    total = torch.stack(kl_terms).mean()
    total.backward()
    largest = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
    if moved:
        assert float(total.detach()) > 0 and largest > 0
    else:
        assert float(total.detach()) == 0.0 and largest == 0.0


def test_lora_scale_zero_is_the_base_model_bitwise_and_scales_restore():
    from alignprop.platform.models import build_tiny, lora_delta_norm, lora_scaled
    from alignprop.trainers.sampling import SamplerSettings, encode_prompts, negative_prompt, sample

    pipe = build_tiny("sd")
    cond, negative = encode_prompts(pipe, ["a cat"], torch.device("cpu")), negative_prompt(pipe, 1, "cpu")
    settings = SamplerSettings(4, 5.0, 1.0, 32)

    def images():
        with torch.no_grad():
            return sample(pipe, pipe.unet, cond, negative, torch.Generator().manual_seed(0), settings).images

    base = images()
    perturbed_lora(pipe.unet)
    tuned, norm = images(), lora_delta_norm(pipe.unet)
    assert not torch.equal(tuned, base)
    with lora_scaled(pipe.unet, 0.0):
        assert torch.equal(images(), base) and lora_delta_norm(pipe.unet) == 0.0
    with lora_scaled(pipe.unet, 0.5):
        assert lora_delta_norm(pipe.unet) == pytest.approx(norm / 2, rel=1e-6)
    assert torch.equal(images(), tuned)


def test_each_evaluation_scores_every_lora_scale_and_the_kl_to_base(deepspeed_world, tmp_path):
    """eval_lora0/… is the base model's evaluation exactly; eval/kl_to_base is 0 at the base and > 0 after."""
    from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext

    overrides = ["trainer.eval_prompts=[a cat, a dog]", "trainer.eval_seeds=1", "sampling.num_steps=4",
                 "truncation.k=2", "deepspeed.zero_stage=1"]
    base = AlignPropRecipe(load_config("tiny-cpu", overrides), WorkerContext(progress=False)).setup().evaluate(0)
    assert base["eval/kl_to_base"] == 0.0 and base["eval/lora_delta_norm"] == 0.0
    recipe = AlignPropRecipe(load_config("tiny-cpu", [*overrides, "trainer.eval_lora_scales=[0, 0.5, 1.0]"]),
                             WorkerContext(progress=False)).setup()
    with torch.no_grad():
        for name, p in recipe.lora_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    moved = recipe.evaluate(0)
    assert moved["eval_lora0/reward_total"] == base["eval/reward_total"]  # scale 0: the base pipeline's images
    assert moved["eval/reward_total"] != base["eval/reward_total"] and moved["eval/kl_to_base"] > 0
    assert moved["eval_lora0.5/lora_delta_norm"] == pytest.approx(moved["eval/lora_delta_norm"] / 2, rel=1e-5)
    assert "eval_lora1/reward_total" not in moved
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # every name is one MLflow accepts
    run_id = client.create_run(client.create_experiment("names")).info.run_id
    client.log_batch(run_id, metrics=[Metric(key, value, 0, 0) for key, value in moved.items()])
    with pytest.raises(ConfigError, match=r"^trainer.eval_lora_scales: got \[0.5, 0.5\]; accepted: distinct"):
        load_config("tiny-cpu", ["trainer.eval_lora_scales=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"^optim.kl_coef: got 0.1 with trainer.algorithm=grpo"):
        load_config("tiny-cpu", ["trainer.algorithm=grpo", "sampling.eta=1.0", "optim.kl_coef=0.1"])


@pytest.mark.parametrize("algorithm", ["alignprop", "refl", "draft_lv", "ddpo"])
def test_kl_coef_trains_every_algorithm_and_logs_kl(deepspeed_world, algorithm):
    from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext

    cfg = load_config("tiny-cpu", [f"trainer.algorithm={algorithm}", "optim.kl_coef=0.5", "sampling.eta=1.0",
                                   "sampling.num_steps=4", "truncation.k=2", "trainer.eval_every=0",
                                   "deepspeed.zero_stage=1", "optim.lr=1e-2"])
    recipe = AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()
    first, second = recipe.train_step(0), recipe.train_step(1)
    assert first["kl"] == 0.0 and second["kl"] > 0, (first, second)  # the LoRA starts at the base model


def test_alignprop_sample_at_lora_scale_zero_writes_the_base_images(tmp_path):
    from PIL import Image

    from alignprop.platform.models import build_tiny, save_lora
    from alignprop.platform.sample import write_samples

    pipe = build_tiny("sd")
    perturbed_lora(pipe.unet, scale=0.3)
    save_lora(pipe.unet, tmp_path / "lora")
    cfg = load_config("tiny-cpu", ["sampling.num_steps=3", "truncation.k=3"])
    for scale, same in ((0.0, True), (1.0, False)):
        base, lora = write_samples(cfg, ["a cat"], str(tmp_path / f"out{scale}"), str(tmp_path / "lora"),
                                   lora_scale=scale)
        assert (list(Image.open(base).getdata()) == list(Image.open(lora).getdata())) is same, scale


def test_overoptimisation_plot_is_logged_for_a_gold_metric_and_not_without_one(tmp_path):
    from mlflow import MlflowClient

    from alignprop.platform.tracking.overoptimisation import PLOT_NAME, log_overoptimisation_plot, panels

    assert panels(load_config("tiny-cpu")) is None  # selects on the trained reward: nothing to set beside it
    cfg = load_config("toy-count", ["trainer.eval_lora_scales=[0.5, 1.0]"])
    proxy_gold = panels(cfg)["proxy (trained) and gold (selects lora/best)"]
    assert proxy_gold == ["eval/toy_count", "eval/toy_count_judge", "eval_lora0.5/toy_count_judge"]
    asked = panels(cfg)["what else the prompt asks (eval_rewards)"]
    assert {"eval/toy_color_match", "eval_lora0.5/toy_background_match"} <= set(asked)
    assert "eval/toy_count_exact" not in asked  # the gold's 1/0 twin
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("plot")).info.run_id
    for step, (proxy, gold) in enumerate([(-1.6, -1.5), (-1.0, -1.0), (-0.5, -1.2)]):
        for key, value in (("eval/toy_count", proxy), ("eval/toy_count_judge", gold), ("eval/kl_to_base", step)):
            client.log_metric(run_id, key, value, step=step * 10)
    assert log_overoptimisation_plot(uri, run_id, cfg) == PLOT_NAME
    assert PLOT_NAME in {f.path for f in client.list_artifacts(run_id)}
