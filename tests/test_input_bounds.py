"""Bad input and resource bombs are one line before anything is allocated, and a run that diverges
stops: bounds on every scale, YAML alias bombs, adapters that do not fit their base model or lie about
their rank, a NaN during training (issue 20's classes, each measured as a traceback before)."""

from __future__ import annotations

import json
import resource
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignprop.platform.config import ConfigError, LoraSection, load_config
from alignprop.platform.errors import NonFiniteError
from alignprop.platform.models import add_lora, build_tiny_pipeline, save_lora
from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext
from test_cli_errors import assert_one_error_line, run_cli


@pytest.mark.parametrize("override, field", [
    ("optim.lr=1e308", "optim.lr"), ("sampling.num_steps=1000000", "sampling.num_steps"),
    ("trainer.batch_size=100000000", "trainer.batch_size"), ("lora.rank=100000000", "lora.rank"),
    ("sampling.resolution=100000", "sampling.resolution"), ("sampling.guidance_scale=1e308", "sampling.guidance_scale"),
    ("trainer.seed=100000000000000000000", "trainer.seed"), ("optim.loss_scale=1e30", "optim.loss_scale"),
    ("rewards.brightness.weight=1e300", "rewards[0].weight"), ("ray.num_workers=100000", "ray.num_workers"),
])
def test_scales_past_their_bounds_are_refused_in_one_line(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", [override])
    message = str(err.value)
    assert message.startswith(f"{field}: got ") and "accepted:" in message and "\n" not in message, message


def test_every_shipped_preset_is_within_the_bounds():
    from alignprop.platform.config import list_presets

    for preset in list_presets():
        load_config(preset, paths=False)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("kind", ["config", "space"])
def test_a_billion_laughs_yaml_is_refused_without_expanding_it(tmp_path, kind):
    """Ten levels of ten aliases: 10^10 values once expanded; refused in one line at a few MB of memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "config":
        (tmp_path / "bomb.yaml").write_text(BOMB)
        args = ["train", "--config", str(tmp_path / "bomb.yaml")]
    else:
        (tmp_path / "bomb.yaml").write_text("metric: eval/reward_total\nspace: {optim.lr: {space: choice, categories: "
                                            "[0.1]}}\n" + BOMB)
        args = ["tune", "--config", "tiny-cpu", "--space", str(tmp_path / "bomb.yaml")]
    proc = run_cli(args, tmp_path)
    message = assert_one_error_line(proc, "")
    assert "bomb.yaml" in message and "alias" in message, message
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 200, f"peak RSS grew {grew_mb:.0f} MB"


@pytest.fixture()
def adapter(tmp_path):
    pipe = build_tiny_pipeline()
    add_lora(pipe.unet, LoraSection(rank=4, alpha=4.0))
    return save_lora(pipe.unet, tmp_path / "lora")


def _rewrite(path, tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        old_meta = f.metadata() or {}
    save_file(tensors if tensors is not None else load_file(str(path)), str(path),
              metadata=old_meta if metadata is None else metadata)


def test_sample_refuses_a_file_that_is_no_lora(tmp_path):
    save_file({"weight": torch.ones(3, 3)}, str(tmp_path / "x.safetensors"))
    proc = run_cli(["sample", "--config", "tiny-cpu", "--lora", str(tmp_path / "x.safetensors"), "--prompt", "a cat",
                    "--out", "out"], tmp_path)
    assert "holds no LoRA weights" in assert_one_error_line(proc, "--lora: ")
    assert not (tmp_path / "out").exists()


def test_sample_refuses_an_adapter_of_another_base_model(adapter, tmp_path):
    state = load_file(str(adapter))
    key = next(k for k in state if k.endswith(("lora.down.weight", "lora_A.weight")))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)  # another model's layer width
    _rewrite(adapter, state)
    proc = run_cli(["sample", "--config", "tiny-cpu", "--lora", str(adapter), "--prompt", "a cat", "--out", "out"],
                   tmp_path)
    assert "features, the base model's layer" in assert_one_error_line(proc, "--lora: ")


def test_sample_refuses_malformed_metadata(adapter, tmp_path):
    _rewrite(adapter, metadata={"lora_adapter_metadata": "{not json"})
    proc = run_cli(["sample", "--config", "tiny-cpu", "--lora", str(adapter), "--prompt", "a cat", "--out", "out"],
                   tmp_path)
    assert "metadata" in assert_one_error_line(proc, "--lora: ")


def test_soup_refuses_metadata_that_lies_about_the_rank_and_writes_nothing(adapter, tmp_path):
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    meta["unet.r"] = 8  # the tensors have rank 4
    liar = shutil.copytree(adapter.parent, tmp_path / "liar") / adapter.name
    _rewrite(liar, metadata={"lora_adapter_metadata": json.dumps(meta)})
    proc = run_cli(["soup", "--lora", str(adapter.parent), "--lora", str(liar.parent), "--weights", "0.5", "0.5",
                    "--out", "mix"], tmp_path)
    assert "its metadata says rank 8 but" in assert_one_error_line(proc, "--lora: ")
    assert not (tmp_path / "mix").exists()


def test_soup_refuses_adapters_of_different_shapes(tmp_path):
    def one(name, width):
        directory = tmp_path / name
        directory.mkdir()
        save_file({"unet.a.lora.down.weight": torch.ones(2, width), "unet.a.lora.up.weight": torch.ones(4, 2)},
                  str(directory / "pytorch_lora_weights.safetensors"))
        return str(directory)

    proc = run_cli(["soup", "--lora", one("a", 4), "--lora", one("b", 6), "--weights", "0.5", "0.5", "--out", "mix"],
                   tmp_path)
    assert "different shapes" in assert_one_error_line(proc, "--lora: ")


def test_a_run_that_goes_non_finite_stops_naming_the_step_and_keeps_its_checkpoints(deepspeed_world):
    reported = {}

    def report(metrics, directory):
        reported[metrics["step"]] = directory is not None
        if metrics["step"] == 2:  # the weights diverge after step 2 (what lr=1e308 did: all LoRA tensors NaN)
            for _, p in recipe.lora_parameters():
                p.data.fill_(float("nan"))

    cfg = load_config("tiny-cpu", ["trainer.eval_every=0", "trainer.ckpt_every=1", "trainer.max_steps=5",
                                   "sampling.num_steps=4", "truncation.k=2"])
    recipe = AlignPropRecipe(cfg, WorkerContext(progress=False, report=report)).setup()
    with pytest.raises(NonFiniteError, match=r"^step 3: loss nan.* not finite; the run stops and its earlier "):
        recipe.train()
    assert reported == {1: True, 2: True}, "step 3 was neither reported nor checkpointed"
