"""The toy world: generator and ground truth, the analytic judge, the build (resume, CLI), the
shipped pipeline (loads offline, passes a small quality bar), the judge as eval rewards."""

from __future__ import annotations

import hashlib
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from alignprop.platform.config import ConfigError
from alignprop.platform.toy_world.judge import evaluate, judge
from alignprop.platform.toy_world import (GAP, HELDOUT_CAPTIONS, SIZE, TRAIN_CAPTIONS, Caption, all_captions, batch,
                                          parse_caption)
from alignprop.rewards import build_reward, validate_reward_specs


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_captions_follow_one_grammar_and_split_into_train_and_heldout():
    assert parse_caption("two red circles on a white background") == Caption(2, "red", "circle", "white")
    assert parse_caption("one blue square on a gray background") == Caption(1, "blue", "square", "gray")
    for bad in ("two red circle on a white background", "one red circles on a white background",
                "five red circles on a white background", "two pink circles on a white background", "a cat"):
        assert parse_caption(bad) is None, bad
    captions = all_captions()
    assert len(captions) == 216 and all(parse_caption(c.text) == c for c in captions)
    assert len(TRAIN_CAPTIONS) == 120 and len(HELDOUT_CAPTIONS) == 96
    assert set(TRAIN_CAPTIONS) | set(HELDOUT_CAPTIONS) == set(captions)
    assert not set(TRAIN_CAPTIONS) & set(HELDOUT_CAPTIONS)
    # every pair of attribute values (e.g. count 2 with purple) is still seen in training
    values = lambda c: (c.count, c.colour, c.shape, c.background)  # noqa: E731
    # noqa: E731
    pairs = lambda cs: {(i, values(c)[i], j, values(c)[j]) for c in cs for i, j in combinations(range(4), 2)}
    assert pairs(TRAIN_CAPTIONS) == pairs(captions)


def test_generator_is_seeded_and_exposes_the_ground_truth():
    scenes, images = batch(7, 64, HELDOUT_CAPTIONS)
    again_scenes, again = batch(7, 64, HELDOUT_CAPTIONS)
    assert scenes == again_scenes and np.array_equal(images, again)
    assert not np.array_equal(images, batch(8, 64, HELDOUT_CAPTIONS)[1])
    assert images.shape == (64, SIZE, SIZE, 3) and images.dtype == np.uint8
    for scene in scenes:
        truth = parse_caption(scene.caption)
        assert truth in HELDOUT_CAPTIONS and scene.count == truth.count == len(scene.boxes)
        assert scene.colours == (truth.colour,) * truth.count and scene.shapes == (truth.shape,) * truth.count
        for (x, y, s), (x2, y2, s2) in combinations(scene.boxes, 2):  # boxes GAP pixels apart, inside the image
            assert x >= x2 + s2 + GAP or x2 >= x + s + GAP or y >= y2 + s2 + GAP or y2 >= y + s + GAP
        assert all(1 <= v and v + s <= SIZE - 1 for x, y, s in scene.boxes for v in (x, y))


def test_judge_recovers_count_and_colour_of_generated_images_exactly():
    scenes, images = batch(3, 256, TRAIN_CAPTIONS + HELDOUT_CAPTIONS)
    verdict = judge(pixels(images))
    assert verdict.count.tolist() == [s.count for s in scenes]
    assert verdict.colour == [s.caption_.colour for s in scenes]
    assert judge(torch.ones(1, 3, 32, 32)).count.tolist() == [0]  # a blank background has no objects


def test_toy_text_side_has_one_token_per_word_and_tells_every_caption_apart():
    from alignprop.platform.models import build_tiny_pipeline
    from alignprop.platform.toy_world.text import toy_text_components

    stock = build_tiny_pipeline()
    tokenizer, encoder = toy_text_components(stock)
    assert tokenizer.tokenize("two red circles on a white background") == [
        "two</w>", "red</w>", "circles</w>", "on</w>", "a</w>", "white</w>", "background</w>"]
    assert tokenizer("a cat").input_ids == stock.tokenizer("a cat").input_ids  # other text: bytes, as before
    texts = [c.text for c in all_captions()] + [""]
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        flat = encoder(ids)[0].flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(len(texts)) * 1e9
    assert dist.min() > 0.05 * flat.norm(dim=1).mean()  # distinct, not just numerically


def test_judge_rewards_score_eval_only_with_targets_from_prompt_or_options():
    scenes, images = batch(5, 16, HELDOUT_CAPTIONS)
    x, prompts = pixels(images), [s.caption for s in scenes]
    count, colour = build_reward({"name": "toy_count_exact"}), build_reward({"name": "toy_color_match"})
    assert count(x, prompts).tolist() == [1.0] * 16 and colour(x, prompts).tolist() == [1.0] * 16
    shifted = [f"{['two', 'three', 'four', 'one'][s.count - 1]} cats" for s in scenes]  # loose prompts: words found
    assert count(x, shifted).tolist() == [0.0] * 16
    red = build_reward({"name": "toy_color_match", "color": "red"})
    assert red(x, prompts).tolist() == [float(s.caption_.colour == "red") for s in scenes]
    with pytest.raises(ValueError, match="names no count"):
        count(x[:1], ["a cat"])
    with pytest.raises(ConfigError, match="has no gradient; accepted in eval_rewards"):
        validate_reward_specs([{"name": "toy_count_exact"}], "rewards", allow_empty=False)
    validate_reward_specs([{"name": "toy_count_exact", "target": 2}, {"name": "toy_color_match"}], "eval_rewards", True)
    with pytest.raises(ConfigError, match=r"eval_rewards\[0\]\.color: got 'orange'; accepted: red, yellow"):
        validate_reward_specs([{"name": "toy_color_match", "color": "orange"}], "eval_rewards", True)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{d}/{k}": v for d in ("unet", "vae") for k,
            v in load_file(str(directory / d / "diffusion_pytorch_model.safetensors")).items()}


def test_build_resumes_bitwise_after_an_interruption(tmp_path, monkeypatch):
    from alignprop.platform.toy_world import pretrain as tb

    plan = {"options": {**tb.BuildOptions(vae_batch=4, unet_batch=4, dataset_size=16).identity()},
            "vae_plan": {"decay_start": 1, "horizon": 2, "stop": 2, "threads": [[0, 1]]},
            "unet_plan": {"decay_start": 2, "horizon": 4, "stop": 3, "threads": [[0, 1], [2, 2]]}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    opts = tb.BuildOptions(replay=str(tmp_path / "plan.json"), ckpt_every_s=0, eval_prompts=0)
    tb.build(tmp_path / "whole", opts)
    real_step = tb._unet_step

    def crash_at_step_2(*args):
        if args[-1] == 2:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(tb, "_unet_step", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        tb.build(tmp_path / "resumed", opts)
    assert (tmp_path / "resumed" / ".state" / "state.json").exists()
    with pytest.raises(ConfigError, match=r"--seed: got 1 but the interrupted build .* used 0"):
        tb.build(tmp_path / "resumed", tb.BuildOptions(vae_batch=4, unet_batch=4, dataset_size=16, seed=1))
    monkeypatch.setattr(tb, "_unet_step", real_step)
    result = tb.build(tmp_path / "resumed", opts)
    assert result.record["sessions"] == 2 and result.record["unet_step"] == 3
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert all(v.dtype == torch.float16 for v in whole.values())
    assert not (tmp_path / "resumed" / ".state").exists()
    with pytest.raises(ConfigError, match="already holds a built pipeline"):
        tb.build(tmp_path / "whole", opts)


@pytest.mark.slow
def test_cli_builds_to_a_time_budget_and_the_directory_loads_offline(tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from alignprop.platform.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "toy"
    code = main(["toy-world", "build", str(out), "--budget-min", "0.25", "--vae-batch", "8", "--unet-batch", "8",
                 "--dataset-size", "64", "--eval-prompts", "2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.strip().splitlines()[-1] == str(out)
    assert "[toy-world] built" in printed.out and "judge (held-out" in printed.out
    assert re.search(r"VAE: .*\d+/\d+ s", printed.err) and re.search(r"UNet: .*step \d+", printed.err)  # the bar
    build_md = (out / "BUILD.md").read_text()
    assert "alignprop toy-world build" in build_md
    for f in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() in build_md
    pipe = StableDiffusionPipeline.from_pretrained(out)  # the plain call: fp16 on disk, every part fp32 loaded
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("one red circle on a white background", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


def test_build_refuses_bad_options_in_one_line(tmp_path, capsys):
    from alignprop.platform.cli import main

    assert main(["toy-world", "build", str(tmp_path / "x"), "--vae-share", "1.5"]) == 2
    assert "--vae-share: got 1.5; accepted: a fraction strictly between 0 and 1" in capsys.readouterr().err
    assert main(["toy-world", "eval", str(tmp_path), "--prompts", "1"]) == 2
    assert "is not a diffusers pipeline directory" in capsys.readouterr().err


def test_shipped_pipeline_loads_offline_and_passes_a_small_quality_bar(capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from alignprop.platform.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["toy-world", "path"]) == 0
    shipped = Path(capsys.readouterr().out.strip().splitlines()[-1])
    build_md = (shipped / "BUILD.md").read_text()
    for path in sorted(shipped.glob("*/*.safetensors")):  # the shipped files are the recorded ones
        assert hashlib.sha256(path.read_bytes()).hexdigest() in build_md, path
    pipe = StableDiffusionPipeline.from_pretrained(shipped)  # what a diffusers user writes: no dtype, no options
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    report = evaluate(pipe, [c.text for c in HELDOUT_CAPTIONS[:16]], seeds=(0,))
    assert report.colour_match >= 0.8 and report.count_exact >= 0.6, report.summary()
    assert report.count_within_one >= 0.85, report.summary()


def test_reward_model_targets_are_the_generator_truth():
    from alignprop.platform.toy_world.reward_training import ground_truth

    truth = ground_truth([0, 1], 96)
    counts = truth.density.sum((1, 2))
    assert judge(truth.images).count.tolist() == counts.round().int().tolist()  # blanks included
    assert (counts == 0).any() and (counts.round() - counts).abs().max() < 1e-4
    torch.testing.assert_close(truth.coverage.sum(1), torch.ones(96, 16, 16))


def test_reward_models_train_and_record_their_weights(tmp_path):
    from alignprop.platform.toy_world.reward_training import train_rewards

    summary = train_rewards(tmp_path, seed=0, budget_min=0.03, batch_size=8)
    assert "count MAE" in summary
    build_md = (tmp_path / "BUILD.md").read_text()
    for name in ("toy_count", "toy_color"):
        path = tmp_path / "rewards" / f"{name}.safetensors"
        assert hashlib.sha256(path.read_bytes()).hexdigest() in build_md
        reward = build_reward({"name": name, "model": str(path)})
        assert reward(torch.rand(2, 3, 32, 32), ["two red circles on a white background"] * 2).shape == (2,)


def test_shipped_reward_models_follow_the_truth_and_pass_gradients_to_pixels():
    scenes, images = batch(21, 64, HELDOUT_CAPTIONS)
    x, prompts = pixels(images).requires_grad_(True), [s.caption for s in scenes]
    count, colour = build_reward({"name": "toy_count"}), build_reward({"name": "toy_color"})
    (count(x, prompts).sum() + colour(x, prompts).sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable down to the pixels
    soft = count.count(x.detach())
    assert (soft.round() == torch.tensor([float(s.count) for s in scenes])).float().mean() >= 0.9, soft
    others = [next(c for c in ("red", "blue") if c != s.caption_.colour) for s in scenes]
    right = colour(x.detach(), prompts)
    wrong = build_reward({"name": "toy_color"})(x.detach(), [f"one {c} circle" for c in others])
    assert (right > wrong).float().mean() >= 0.95


def test_toy_prompt_files_are_the_split_and_presets_name_the_shipped_pipeline():
    from alignprop.platform.config import load_config, read_prompt_file
    from alignprop.platform.models import model_path
    from alignprop.platform.toy_world import SHIPPED_DIR

    assert read_prompt_file("toy_train.txt") == [c.text for c in TRAIN_CAPTIONS]
    assert read_prompt_file("toy_heldout.txt") == [c.text for c in HELDOUT_CAPTIONS]
    assert read_prompt_file("toy_eval.txt") == [c.text for c in HELDOUT_CAPTIONS[:32]]
    validation = read_prompt_file("toy_val.txt")  # the validation split: disjoint from test and training
    assert validation == [c.text for c in HELDOUT_CAPTIONS[32:]] and len(validation) == 64
    assert not set(validation) & set(read_prompt_file("toy_eval.txt")) and not set(validation) & set(
        read_prompt_file("toy_train.txt"))
    assert model_path("toy-world") == str(SHIPPED_DIR) and model_path("org/name") == "org/name"
    for preset in ("toy-count", "toy-compress", "toy-mix"):
        cfg = load_config(preset)
        assert cfg.model.pretrained == "toy-world" and cfg.sampling.resolution == 32, preset
        assert {"toy_count_exact", "toy_color_match"} <= {r["name"] for r in cfg.eval_rewards}, preset


def test_words_outside_the_toy_worlds_grammar_are_named_in_one_warning(tmp_path):
    """The shipped prompt sets are all grammar; `alignprop sample` on the toy world says which words of
    a free prompt its text encoder never saw, and still samples."""
    from alignprop.platform.config import load_config
    from alignprop.platform.toy_world import vocabulary_warning
    from alignprop.platform.tracking import prompt_sets
    from test_cli_errors import run_cli

    for preset in ("toy-count", "toy-compress", "toy-mix"):
        assert vocabulary_warning([p for d in prompt_sets(load_config(preset)) for p in d.prompts]) is None, preset
    proc = run_cli(["sample", "--config", "toy-count", "--prompt", "a photo of a Dragon", "--prompt",
                    "two red circles on a white background", "--out", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (warning,) = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warning.startswith("[alignprop] warning: the toy world's pipeline knows only its caption grammar (22 "
                              "words") and warning.endswith("mean nothing to it: dragon, of, photo"), warning
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["base_00.png", "base_01.png"]


@pytest.mark.slow
def test_alignprop_on_toy_count_moves_the_analytic_count(deepspeed_world):
    """A short toy-count run (exactly one object): the learned count reward rises on held-out
    captions, and the judge (no learned model) agrees that many more samples show exactly one."""
    from alignprop.platform.config import load_config
    from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext

    steps = 30  # the preset's length; one process with the batch of its two workers (2 × 4)
    cfg = load_config("toy-count", ["trainer.eval_every=0", "deepspeed.zero_stage=1", "trainer.batch_size=8"])
    recipe = AlignPropRecipe(cfg, WorkerContext(progress=False)).setup()
    before = recipe.evaluate(0)
    for step in range(steps):
        recipe.train_step(step)
    after = recipe.evaluate(steps)
    assert after["eval/toy_count"] > before["eval/toy_count"] + 0.3, (before, after)  # measured −1.61 → −0.76
    assert after["eval/toy_count_exact"] >= before["eval/toy_count_exact"] + 0.2, (before, after)  # 0.19 → 0.59
