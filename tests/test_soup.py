"""`alignprop soup`: mixed adapters load into the pipeline and equal the weighted sum of updates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alignprop.platform.config import LoraSection
from alignprop.platform.models import add_lora, build_tiny_pipeline, save_lora
from alignprop.platform.soup import read_lora, soup
from conftest import subprocess_env


def trained_adapter(tmp_path, name, seed, rank, alpha):
    pipe = build_tiny_pipeline()
    add_lora(pipe.unet, LoraSection(rank=rank, alpha=alpha))
    torch.manual_seed(seed)
    for n, p in pipe.unet.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.2)
    save_lora(pipe.unet, tmp_path / name)
    return tmp_path / name


def delta_weights(path):
    """module → the dense update scale · B A that an adapter adds."""
    state, meta = read_lora(path)
    out = {}
    for key in state:
        if key.endswith("lora.down.weight"):
            down, up = state[key], state[key.replace("lora.down", "lora.up")]
            out[key] = (meta["lora_alpha"] / down.shape[0]) * up @ down
    return out


def test_delta_soup_is_the_exact_weighted_sum_of_updates(tmp_path):
    a = trained_adapter(tmp_path, "a", 0, rank=2, alpha=4)
    b = trained_adapter(tmp_path, "b", 1, rank=4, alpha=4)
    mixed = soup([str(a), str(b)], [0.7, 0.3], str(tmp_path / "mix"))
    da, db, dm = delta_weights(a), delta_weights(b), delta_weights(mixed.parent)
    assert dm.keys() == da.keys()
    for key in da:
        torch.testing.assert_close(dm[key], 0.7 * da[key] + 0.3 * db[key], rtol=1e-5, atol=1e-6)
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(mixed.parent))  # diffusers-loadable


def test_soup_cli_params_mode_and_errors(tmp_path):
    a = trained_adapter(tmp_path, "a", 0, rank=2, alpha=2)
    b = trained_adapter(tmp_path, "b", 1, rank=2, alpha=2)
    cli = [sys.executable, "-m", "alignprop.platform.cli", "soup", "--lora", str(a), "--lora", str(b)]
    ok = subprocess.run(cli + ["--weights", "0.5", "0.5", "--mode", "params", "--out", str(tmp_path / "avg")],
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    (sa, _), (sb, _), (sm, _) = read_lora(a), read_lora(b), read_lora(tmp_path / "avg")
    for key in sa:
        torch.testing.assert_close(sm[key], 0.5 * sa[key] + 0.5 * sb[key])
    bad = subprocess.run(cli + ["--weights", "1.0", "--out", str(tmp_path / "x")], env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("alignprop: error: --weights:")


def test_params_mode_refuses_different_ranks(tmp_path):
    a = trained_adapter(tmp_path, "a", 0, rank=2, alpha=2)
    b = trained_adapter(tmp_path, "b", 1, rank=4, alpha=2)
    with pytest.raises(ValueError, match="--mode params"):
        soup([str(a), str(b)], [0.5, 0.5], str(tmp_path / "x"), mode="params")
