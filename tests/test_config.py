"""Config schema, presets, one-line errors, deterministic names, and the stdlib-platform trap."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignprop.platform.config import ConfigError, list_presets, load_config, run_name
from conftest import REPO, subprocess_env


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_validates(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert (REPO / "platform" / "configs" / f"{preset}.yaml").read_text().startswith("#"), "preset header shows its command"


def test_tiny_preset_is_the_offline_demo():
    cfg = load_config("tiny-cpu")
    assert cfg.model.tiny and cfg.ray.num_workers == 2 and cfg.deepspeed.zero_stage == 2


def test_overrides_merge_last_and_types_are_coerced():
    cfg = load_config("tiny-cpu", ["optim.lr=3e-4", "truncation.k=5", "ray.num_workers=1"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.truncation.k == 5 and cfg.ray.num_workers == 1


BAD = [
    (["truncation.k=11"], "truncation.k"),  # K > N
    (["truncation.k=0"], "truncation.k"),
    (["truncation.strategy=linear"], "truncation.strategy"),
    (["truncation.strategy=uniform", "truncation.low=5", "truncation.high=2"], "truncation.low"),
    (["sampling.num_steps=-3"], "sampling.num_steps"),
    (["sampling.resolution=30"], "sampling.resolution"),
    (["sampling.eta=2"], "sampling.eta"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.bogus=1"], "optim.bogus"),
    (["trainer.max_steps=-1"], "trainer.max_steps"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["rewards=[{name: aesthetics}]"], "rewards[0].name"),
    (["rewards=[]"], "rewards"),
    (["rewards=[{name: brightness, shade: 2}]"], "rewards[0].shade"),
    (["eval_rewards=[{name: brightness, weight: heavy}]"], "eval_rewards[0].weight"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.precision=fp16"], "deepspeed.precision"),  # fp16 needs a GPU
    (["ray.num_workers=0"], "ray.num_workers"),
    (["model.dtype=int8"], "model.dtype"),
    (["model.pretrained=runwayml/stable-diffusion-v1-5"], "model"),  # both tiny and pretrained
    (["tracking.uri=mlflow.db"], "tracking.uri"),
    (["lora.rank=0"], "lora.rank"),
    (["trainer.eval_prompts=[]"], "trainer.eval_prompts"),
    (["trainer.prompt_file=nope.txt"], "trainer.prompt_file"),
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{field}:"), message
    assert "accepted" in message or "set exactly one" in message, message


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="accepted: .*tiny-cpu"):
        load_config("no-such-preset")


def test_cli_reports_config_error_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alignprop.platform.cli", "train", "--config", "tiny-cpu", "truncation.k=99",
         f"tracking.uri=sqlite:///{tmp_path}/m.db", f"ray.storage_path={tmp_path}/ray"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "alignprop: error: truncation.k: got 99; accepted: 1 <= k <= sampling.num_steps (10)"
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists(), "nothing is created on bad input"


def test_run_name_is_deterministic_and_ignores_run_length():
    a = run_name(load_config("tiny-cpu"))
    assert a == run_name(load_config("tiny-cpu", ["trainer.max_steps=999", "ray.num_workers=1"]))
    assert a != run_name(load_config("tiny-cpu", ["optim.lr=1e-4"]))
    assert run_name(load_config("tiny-cpu", ["tracking.run_name=mine"])) == "mine"


def test_stdlib_platform_wins_from_the_repo_root():
    proc = subprocess.run(
        [sys.executable, "-c", "import platform, sys; assert platform.__file__.endswith('platform.py'), platform.__file__; "
         "import alignprop.platform.config as c; print(platform.system(), c.__file__)"],
        cwd=REPO, capture_output=True, text=True, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert not (REPO / "platform" / "__init__.py").exists()


def test_prompt_files_ship_with_the_package_and_load_from_a_path(tmp_path):
    from alignprop.trainers.alignprop import load_prompts

    shipped = load_prompts(load_config("tiny-cpu"))
    assert "cat" in shipped and not any(p.startswith("#") for p in shipped)
    (tmp_path / "mine.txt").write_text("# my prompts\nthree apples\n\ntwo dogs\n")
    cfg = load_config("tiny-cpu", [f"trainer.prompt_file={tmp_path / 'mine.txt'}"])
    assert load_prompts(cfg) == ["three apples", "two dogs"]


def test_rewards_list_cli_names_every_reward_and_its_weights():
    proc = subprocess.run([sys.executable, "-m", "alignprop.platform.cli", "rewards", "list"],
                          capture_output=True, text=True, env=subprocess_env(HF_HUB_OFFLINE="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("aesthetic", "hpsv2", "pickscore", "compressibility", "jpeg_size", "object_count", "brightness"):
        assert f"\n{name} " in f"\n{proc.stdout}", name
    assert "mlp_path=not set (required)" in proc.stdout and "checkpoint=not set (required)" in proc.stdout
