"""`alignprop bench` (per-phase timings, FLOPs, the checkpoint modes as cells, --json) and the GPU
check's code path, run on CPU with the tiny pipeline (`gpu_check --dry-run`)."""

from __future__ import annotations

import json

import pytest
import torch

from alignprop.platform.bench import steps as bench
from alignprop.platform.config import ConfigError, load_config

TINY = ["sampling.num_steps=2", "truncation.k=1", "trainer.batch_size=1"]


def test_bench_json_prints_one_object_per_cell_with_phases(capsys):
    rows = bench.run_bench(load_config("tiny-cpu", TINY), steps=1, ks=[2], json_lines=True)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == json.loads(json.dumps(rows))
    assert [r["checkpoint"] for r in rows] == ["all", "none", "auto"], "auto beside all and none"
    by_mode = {r["checkpoint"]: r for r in rows}
    assert (by_mode["all"]["kept"], by_mode["all"]["recomputed"]) == (0, 2)
    assert (by_mode["none"]["kept"], by_mode["none"]["recomputed"]) == (2, 0)
    assert by_mode["auto"]["kept"] == 2, "the default budget holds two tiny calls"
    for r in rows:
        assert r["k"] == 2 and r["batch"] == 1 and r["peak_mb"] > 0 and r["mfu"] is None  # no MFU on CPU
        assert set(r["phases"]) == set(bench.PHASES) and all(v >= 0 for v in r["phases"].values())
        assert r["s_per_step"] == pytest.approx(sum(r["phases"].values()))
    assert by_mode["all"]["unet_tflop_per_step"] > by_mode["none"]["unet_tflop_per_step"], "recomputation is counted"


def test_denoiser_flops_scale_with_the_batch_and_backward_costs_more(deepspeed_world):
    recipe = bench.build_recipe(load_config("tiny-cpu", TINY), torch.device("cpu"))
    fwd1, bwd1 = bench.denoiser_flops(recipe, 1)
    fwd2, bwd2 = bench.denoiser_flops(recipe, 2)
    assert fwd1 > 0 and fwd2 == 2 * fwd1 and bwd2 == 2 * bwd1
    assert fwd1 < bwd1 < 3 * fwd1, "input gradients of the frozen layers (≈1× forward) + LoRA's weight gradients"


@pytest.mark.parametrize("option, value, message", [
    ("ks", [0], "--k: got 0; accepted: 1 <= K <= sampling.num_steps (2)"),
    ("batches", [0], "--batch: got 0; accepted: integers >= 1"),
    ("modes", ["some"], "--checkpoint: got 'some'; accepted: all, none, auto"),
])
def test_bench_grid_is_checked_before_any_cell_starts(monkeypatch, option, value, message):
    monkeypatch.setattr(bench, "_spawned", lambda *a: pytest.fail("a cell started"))
    with pytest.raises(ConfigError) as err:
        bench.run_bench(load_config("tiny-cpu", TINY), 1, **{option: value})
    assert str(err.value) == message


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_table(deepspeed_world, tmp_path):
    """The prepared GPU script's code path, on CPU with the tiny pipeline: every section gives rows."""
    from alignprop.platform.bench import gpu_check

    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "grid,unet,fast"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu-check.jsonl").read_text().splitlines()]
    assert {r["section"] for r in rows} == {"grid", "unet", "forward", "fast path"}
    assert all(r.get("result", "ok") == "ok" for r in rows), [r for r in rows if r.get("result", "ok") != "ok"]
    assert len([r for r in rows if r["section"] == "grid"]) == 8  # K {1, 4} × batch {1, 2} × all/auto
    table = (tmp_path / "gpu-check.md").read_text()
    assert table.count("\n| grid |") == 8 and "| fast path | channels-last |" in table
