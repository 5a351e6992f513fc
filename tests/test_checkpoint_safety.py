"""Checkpoints are safetensors + JSON only, resume never unpickles, and the format does not depend on
the ZeRO stage (or world size) it was saved with. One process, real DeepSpeed engines (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignprop.platform.config import load_config
from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext
from alignprop.trainers.checkpoint import (ENGINE_STATE_FILE, OPTIMIZER_FILE, UnsafeCheckpointError, base_optimizer,
                                           check_checkpoint_files)

FAST = ["trainer.eval_every=0", "sampling.num_steps=3", "truncation.k=2"]


def recipe(overrides, **ctx):
    cfg = load_config("tiny-cpu", [*FAST, *overrides])
    return AlignPropRecipe(cfg, WorkerContext(progress=False, **ctx)).setup()


def trained_checkpoint(directory: Path, stage: int, steps: int = 2, extra=()) -> AlignPropRecipe:
    r = recipe([f"deepspeed.zero_stage={stage}", *extra])
    for step in range(steps):
        r.train_step(step)
        r.step = step + 1
    r.save_checkpoint(str(directory))
    return r


def files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}


class Exploit:
    """Unpickling this runs a shell command (what a planted checkpoint file could do)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.fixture(scope="module")
def stage2_checkpoint(deepspeed_world, tmp_path_factory):
    """Two steps at ZeRO-2 with EMA, saved: (the directory, the recipe that saved it)."""
    directory = tmp_path_factory.mktemp("stage2") / "ckpt"
    r = trained_checkpoint(directory, 2, extra=["trainer.ema_decay=0.5"])
    return directory, r


def test_a_checkpoint_holds_only_safetensors_and_json(stage2_checkpoint):
    directory, _ = stage2_checkpoint
    names = files(directory)
    assert names == {"pytorch_lora_weights.safetensors", "trainer_state.json", "lora_ema.safetensors",
                     ENGINE_STATE_FILE, OPTIMIZER_FILE, "rng_rank0.safetensors", "manifest_rank0.json"}, names
    assert all(n.endswith((".safetensors", ".json")) for n in names)
    check_checkpoint_files(directory)  # accepted
    state = json.loads((directory / ENGINE_STATE_FILE).read_text())
    assert state["adam_step"] == 2 and state["global_steps"] == 2 and state["world_size"] == 1
    assert state["zero_stage"] == 2 and state["format_version"] == 1


def test_a_planted_pickle_is_refused_before_anything_is_loaded(stage2_checkpoint, tmp_path):
    import shutil

    directory = Path(shutil.copytree(stage2_checkpoint[0], tmp_path / "ckpt"))
    pwned = tmp_path / "pwned"
    (directory / "engine").mkdir()
    torch.save({"module": Exploit(pwned)}, directory / "engine" / "mp_rank_00_model_states.pt")

    with pytest.raises(UnsafeCheckpointError) as err:
        recipe(["deepspeed.zero_stage=2"], resume_dir=str(directory))
    message = str(err.value)
    assert "\n" not in message and "engine/mp_rank_00_model_states.pt" in message, message
    assert "older alignprop" in message and ".safetensors and .json" in message and "tracking.run_name" in message
    assert not pwned.exists(), "resume unpickled the planted file"

    # the payload is live: the old loader (torch.load(weights_only=False)) would have run it
    control = tmp_path / "control"
    torch.save(Exploit(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


@pytest.mark.parametrize("planted", ["nested/deeper/state.pkl", "weights.bin", "rng_rank1.pt", "latest", "notes.txt"])
def test_any_file_but_safetensors_and_json_is_refused(tmp_path, planted):
    (tmp_path / "optimizer.safetensors").write_bytes(b"")
    (tmp_path / "engine_state.json").write_text("{}")
    check_checkpoint_files(tmp_path)
    (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / planted).write_bytes(b"\x80\x04.")
    with pytest.raises(UnsafeCheckpointError, match=planted.replace(".", r"\.")) as err:
        check_checkpoint_files(tmp_path)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_check_checkpoint_files_imports_without_deepspeed(tmp_path):
    """The driver checks checkpoints before starting Ray: the checkpoint module stays cheap to import,
    and the recipe module re-exports the check (and its error) without importing DeepSpeed either."""
    code = ("import sys; from alignprop.trainers.checkpoint import check_checkpoint_files; "
            f"check_checkpoint_files({str(tmp_path)!r}); "
            "heavy = [m for m in ('deepspeed', 'diffusers', 'alignprop.rewards') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "from alignprop.trainers import alignprop, checkpoint; "
            "assert alignprop.check_checkpoint_files is checkpoint.check_checkpoint_files; "
            "assert alignprop.UnsafeCheckpointError is checkpoint.UnsafeCheckpointError; "
            "assert 'deepspeed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def full_state(r: AlignPropRecipe) -> dict[str, torch.Tensor]:
    """Master weights and AdamW moments as this engine holds them (gathered if partitioned)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in r.lora_parameters():
        out[f"{name}.weight"] = p.detach().clone()
        master = safe_get_full_fp32_param(p)
        out[f"{name}.weight_fp32"] = (p if master is None else master).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(p, key)
            out[f"{name}.{key}"] = (r.optimizer.state[p][key] if value is None else value).clone()
    return out


@pytest.mark.parametrize("stage", [0, 1])
def test_a_zero2_checkpoint_loads_at_another_stage_with_the_same_state(stage2_checkpoint, tmp_path, stage):
    directory, _ = stage2_checkpoint
    saved = load_file(directory / OPTIMIZER_FILE)
    r = recipe([f"deepspeed.zero_stage={stage}", "trainer.ema_decay=0.5"], resume_dir=str(directory))
    assert r.engine.zero_optimization_stage() == stage and r.step == 2 and r.engine.global_steps == 2
    state = full_state(r)
    for name, _ in r.lora_parameters():
        assert torch.equal(state[f"{name}.weight"], saved[f"{name}.weight_fp32"]), name
        for key in ("weight_fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[f"{name}.{key}"], saved[f"{name}.{key}"]), (name, key)
    base = base_optimizer(r.engine)
    assert stage == 0 and base is r.optimizer or stage == 1 and base is r.optimizer.optimizer
    assert {int(base.state[q]["step"]) for g in base.param_groups for q in g["params"]} == {2}

    r.save_checkpoint(str(tmp_path / "again"))  # and it saves back the same tensors
    again = load_file(tmp_path / "again" / OPTIMIZER_FILE)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)

    # the loaded state is the one the optimizer steps with: one more step matches ZeRO-2's
    torch.set_rng_state(load_file(directory / "rng_rank0.safetensors")["cpu"])
    r.train_step(2)
    reference = recipe(["deepspeed.zero_stage=2", "trainer.ema_decay=0.5"], resume_dir=str(directory))
    reference.train_step(2)
    expected, got = full_state(reference), full_state(r)
    for key in expected:
        assert torch.equal(got[key], expected[key]), (key, (got[key] - expected[key]).abs().max())


def test_a_checkpoint_saved_before_the_first_step_has_no_adam_state_and_resumes(deepspeed_world, tmp_path):
    r = trained_checkpoint(tmp_path / "ckpt", 1, steps=0)
    assert json.loads((tmp_path / "ckpt" / ENGINE_STATE_FILE).read_text())["adam_step"] is None
    assert not any(k.endswith("exp_avg") for k in load_file(tmp_path / "ckpt" / OPTIMIZER_FILE))
    resumed = recipe(["deepspeed.zero_stage=2"], resume_dir=str(tmp_path / "ckpt"))
    for (name, p), (_, q) in zip(r.lora_parameters(), resumed.lora_parameters()):
        assert torch.equal(p, q), name
    resumed.train_step(0)
    base = base_optimizer(resumed.engine)
    assert int(base.state[base.param_groups[0]["params"][0]]["step"]) == 1
