"""Config schema, presets, one-line errors, deterministic names, and the stdlib-platform trap."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignprop.platform.config import ConfigError, list_presets, load_config, run_name
from conftest import REPO, subprocess_env


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads_and_validates(preset):
    cfg = load_config(preset, paths=False)  # sd15 presets name reward weights that live on a GPU cluster
    assert cfg.name == preset
    header = (REPO / "platform" / "configs" / f"{preset}.yaml").read_text()
    assert header.startswith("#"), "preset header shows its command"


def test_tiny_preset_runs_offline_on_two_workers():
    cfg = load_config("tiny-cpu")
    assert cfg.model.tiny and cfg.ray.num_workers == 2 and cfg.deepspeed.zero_stage == 2


def test_run_params_lead_with_the_algorithm_and_list_only_its_own_section():
    from alignprop.platform.config import flatten, run_params, to_dict

    for algorithm, own in (("alignprop", None), ("ddpo", "ddpo"), ("refl", "refl"), ("draft_lv", "draft_lv"),
                           ("drtune", "drtune"), ("direct_align", "direct_align")):
        cfg = load_config("tiny-cpu", [f"trainer.algorithm={algorithm}"], paths=False)
        params = run_params(cfg)
        sections = {k.split(".", 1)[0] for k in params}
        assert min(params) == "algorithm" and params["algorithm"] == algorithm
        assert sections & {"ddpo", "refl", "draft_lv", "drtune", "direct_align"} == ({own} if own else set()), algorithm
        assert {k: v for k, v in params.items() if k != "algorithm"}.items() <= flatten(to_dict(cfg)).items()


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
    # non-finite numbers pass `> 0` checks and train to garbage
    (["optim.lr=inf"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["sampling.guidance_scale=inf"], "sampling.guidance_scale"),
    (["lora.alpha=inf"], "lora.alpha"),
    (["optim.eps=nan"], "optim.eps"),
    (["optim.eps=0"], "optim.eps"),
    (["rewards=[{name: brightness, weight: .inf}]"], "rewards.brightness.weight"),
    (["rewards=[{name: brightness, weight: .nan}]"], "rewards.brightness.weight"),
    (["truncation.strategy=gaussian", "truncation.low=1", "truncation.high=10", "truncation.mean=inf"],
     "truncation.mean"),
    (["truncation.strategy=gaussian", "truncation.low=1", "truncation.high=10", "truncation.std=nan"],
     "truncation.std"),
    # run names are directory names and MLflow filter values
    (["tracking.run_name=../../escape"], "tracking.run_name"),
    (["tracking.run_name=a'b"], "tracking.run_name"),
    (["tracking.run_name=a/b"], "tracking.run_name"),
    (["name=../x"], "name"),
    (["tracking.uri=foo://x"], "tracking.uri"),
    # OmegaConf jargon, tracebacks, silent nulls
    (["optim=3"], "optim"),
    (["rewards=garbage"], "rewards"),
    (["rewards={name: brightness}"], "rewards"),
    (["lora.target_modules=x"], "lora.target_modules"),
    (["optim.lr"], "override 'optim.lr'"),
    (["name=???"], "name"),
    (["optim.lr=${nope}"], "optim.lr"),
    (["ray.resources_per_worker={GPU: 1}"], "ray.resources_per_worker"),
    (["lora.target_modules=[to_q, nothing_here]"], "lora.target_modules"),
    (["model.tiny=false", "model.pretrained=/no/such/dir"], "model.pretrained"),
    (["model.tiny=false", "model.pretrained=./relative-missing"], "model.pretrained"),
    (["rewards=[{name: aesthetic, mlp_path: /no/such/aesthetic.pth}]"], "rewards[0].mlp_path"),
    (["eval_rewards=[{name: hpsv2, checkpoint: missing.pt}]"], "eval_rewards[0].checkpoint"),
    (["ray.storage_path=/etc/hostname/below-a-file"], "ray.storage_path"),
    # issue 10: architectures, the checkpoint policy, the speed switches
    (["model.tiny=false", "model.arch=sd35"], "model.arch"),
    (["model.arch=sd15"], "model"),  # with model.tiny=true: two sources
    (["model.tiny=false", "model.arch=sd15", "model.family=sdxl"], "model.family"),
    (["sampling.checkpoint_unet=some"], "sampling.checkpoint_unet"),
    (["sampling.activation_budget_mb=-1"], "sampling.activation_budget_mb"),
    (["perf.autocast=fp8"], "perf.autocast"),
    (["perf.autocast=bf16", "deepspeed.precision=bf16", "ray.use_gpu=true"], "perf.autocast"),
    (["perf.attention=flash3"], "perf.attention"),
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{field}:"), message
    assert "accepted" in message or "set exactly one" in message, message


def _write(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("content, problem", [(b"", "has no prompts"), (b"# only\n#comments\n\n", "has no prompts"),
                                              (b"\x00\xff\xfebinary", "is not UTF-8 text"),
                                              (b"a cat\x00", "is not UTF-8 text")])
def test_bad_prompt_files_are_one_line(tmp_path, content, problem):
    with pytest.raises(ConfigError, match=f"^trainer.prompt_file: .*{problem}; accepted: ") as err:
        load_config("tiny-cpu", [f"trainer.prompt_file={_write(tmp_path / 'p.txt', content)}"])
    assert "\n" not in str(err.value)


def test_a_prompt_file_relative_to_the_cwd_is_made_absolute_on_the_driver(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a red cat\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny-cpu", ["trainer.prompt_file=p.txt"])
    assert cfg.trainer.prompt_file == str(tmp_path / "p.txt")
    shipped = load_config("tiny-cpu").trainer.prompt_file
    assert shipped == "simple_animals.txt", "shipped names stay names (stable run hash)"


def test_a_directory_that_is_not_a_pipeline_says_so(tmp_path):
    with pytest.raises(ConfigError, match="^model.pretrained: .* is not a diffusers pipeline directory"):
        load_config("tiny-cpu", ["model.tiny=false", f"model.pretrained={tmp_path}"])


def test_target_modules_are_checked_against_a_saved_pipeline(tmp_path):
    from alignprop.platform.models import save_tiny_pipeline

    save_tiny_pipeline(tmp_path / "pipe")
    base = ["model.tiny=false", f"model.pretrained={tmp_path / 'pipe'}"]
    assert load_config("tiny-cpu", base).model.pretrained == str(tmp_path / "pipe")
    with pytest.raises(ConfigError,
                       match="^lora.target_modules: 'to_x' matches no module of the UNet; accepted: .*to_q"):
        load_config("tiny-cpu", [*base, "lora.target_modules=[to_q, to_x]"])


@pytest.mark.parametrize("text, problem",
                         [("optim: {lr: [\n", "not a readable YAML file"), ("- a\n- b\n", "expected a mapping")])
def test_malformed_or_list_yaml_presets_are_one_line(tmp_path, text, problem):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"^--config .*bad.yaml: {problem}") as err:
        load_config(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(err.value)


def test_config_names_cannot_escape_the_preset_folder():
    with pytest.raises(ConfigError, match="^--config: no such file '../../x'"):
        load_config("../../x")
    with pytest.raises(ConfigError, match="^--config: (unknown preset|no such file)"):
        load_config("..")
    with pytest.raises(ConfigError, match="^--config: unknown preset 'tiny-cpu.'"):
        load_config("tiny-cpu.")


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
    expected = "alignprop: error: truncation.k: got 99; accepted: 1 <= k <= sampling.num_steps (10)"
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists(), "nothing is created on bad input"


def test_checkpoint_unet_takes_the_old_booleans_and_the_modes():
    assert load_config("tiny-cpu", ["sampling.checkpoint_unet=true"]).sampling.checkpoint_unet == "all"
    assert load_config("tiny-cpu", ["sampling.checkpoint_unet=false"]).sampling.checkpoint_unet == "none"
    cfg = load_config("tiny-cpu", ["sampling.checkpoint_unet=auto", "sampling.activation_budget_mb=64"])
    assert (cfg.sampling.checkpoint_unet, cfg.sampling.activation_budget_mb) == ("auto", 64.0)
    cfg = load_config("tiny-cpu",
                      ["model.tiny=false", "model.arch=sd21", "perf.autocast=bf16", "perf.channels_last=true"])
    assert (cfg.model.arch, cfg.perf.autocast, cfg.perf.channels_last) == ("sd21", "bf16", True)


def test_run_names_of_existing_runs_survive_the_new_fields():
    """Fields added later (model.arch, perf.*, activation_budget_mb) at their defaults, and the
    checkpoint_unet bool now spelled all/none, leave the run name as before (runs still resume);
    a non-default value is a new run."""
    assert run_name(load_config("tiny-cpu")) == "tiny-cpu-600248f9"  # measured before issue 10
    assert run_name(load_config("tiny-cpu", ["sampling.checkpoint_unet=all"])) == "tiny-cpu-600248f9"
    assert run_name(load_config("tiny-cpu", ["perf.autocast=bf16"])) != "tiny-cpu-600248f9"


def test_run_name_is_deterministic_and_ignores_run_length():
    a = run_name(load_config("tiny-cpu"))
    assert a == run_name(load_config("tiny-cpu", ["trainer.max_steps=999", "ray.num_workers=1"]))
    assert a != run_name(load_config("tiny-cpu", ["optim.lr=1e-4"]))
    assert run_name(load_config("tiny-cpu", ["tracking.run_name=mine"])) == "mine"


def test_stdlib_platform_wins_from_the_repo_root():
    proc = subprocess.run(
        [sys.executable, "-c", "import platform, sys; assert platform.__file__.endswith('platform.py'), "
                               "platform.__file__; "
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


def test_one_option_of_a_listed_reward_is_an_override():
    cfg = load_config("tiny-cpu", ["rewards.brightness.weight=2.5", "eval_rewards.saturation.label=sat"])
    assert cfg.rewards == [{"name": "brightness", "weight": 2.5}]
    assert cfg.eval_rewards[0] == {"name": "saturation", "label": "sat"}
    with pytest.raises(ConfigError, match="^rewards.nope: no such reward in rewards; accepted: brightness$"):
        load_config("tiny-cpu", ["rewards.nope.weight=2"])
