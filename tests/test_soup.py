"""`alignprop soup`: mixed adapters load into the pipeline and equal the weighted sum of updates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alignprop.platform.config import ConfigError, LoraSection
from alignprop.platform.models import add_lora, build_tiny_pipeline, save_lora
from alignprop.platform.soup.mix import read_lora, soup
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


def fake_adapter(directory, rank=2):
    """A minimal LoRA file (no pipeline needed) for argument and file-format checks."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({"unet.a.lora.down.weight": torch.ones(rank, 4), "unet.a.lora.up.weight": torch.ones(4, rank)},
              str(directory / "pytorch_lora_weights.safetensors"))
    return directory


class _WritesOnUnpickle:
    """Unpickling this creates the marker file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_lora(path, marker):
    import pickle

    path.write_bytes(pickle.dumps({"a.lora.down.weight": _WritesOnUnpickle(marker)}))
    return path


def assert_one_line(err, field):
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{field}: ") and "accepted:" in message, message


@pytest.mark.parametrize("weights", [[float("nan"), 0.5], [0.5, float("inf")], [float("-inf"), float("nan")]],
                         ids=["nan", "inf", "both"])
def test_non_finite_weights_are_refused_before_reading_or_writing(tmp_path, weights):
    a, b = fake_adapter(tmp_path / "a"), fake_adapter(tmp_path / "b")
    with pytest.raises(ConfigError) as err:
        soup([str(a), str(b)], weights, str(tmp_path / "mix"))
    assert_one_line(err, "--weights")
    assert str(err.value).startswith("--weights: got ") and "accepted: finite numbers" in str(err.value)
    assert not (tmp_path / "mix").exists()


@pytest.mark.parametrize("kind, message", [
    ("text", "is not in safetensors format"),
    ("pickle-bin", "is not a .safetensors file"),
    ("pickle-named-safetensors", "is not in safetensors format"),
    ("dir-with-only-bin", "no pytorch_lora_weights.safetensors in"),
    ("no-lora-keys", "holds no LoRA weights"),
])
def test_files_that_are_not_safetensors_adapters_are_refused_unopened(tmp_path, kind, message):
    marker = tmp_path / "unpickled"
    if kind == "text":
        lora = tmp_path / "notes.safetensors"
        lora.write_text("not weights\n")
    elif kind == "pickle-bin":
        lora = pickled_lora(tmp_path / "lora.bin", marker)
    elif kind == "pickle-named-safetensors":
        lora = pickled_lora(tmp_path / "lora.safetensors", marker)
    elif kind == "dir-with-only-bin":
        lora = tmp_path / "old"
        lora.mkdir()
        pickled_lora(lora / "pytorch_lora_weights.bin", marker)
    else:
        from safetensors.torch import save_file

        lora = tmp_path / "other.safetensors"
        save_file({"conv.weight": torch.ones(2, 2)}, str(lora))
    ok = fake_adapter(tmp_path / "ok")
    with pytest.raises((ConfigError, FileNotFoundError)) as err:
        soup([str(ok), str(lora)], [0.5, 0.5], str(tmp_path / "mix"))
    assert_one_line(err, "--lora")
    assert message in str(err.value) and "pytorch_lora_weights.safetensors" in str(err.value), str(err.value)
    assert not marker.exists(), "a pickle was unpickled"
    assert not (tmp_path / "mix").exists()


@pytest.mark.parametrize("base_first", [False, True], ids=["adapter-base", "base-adapter"])
def test_base_is_the_zero_adapter_in_each_mode(tmp_path, base_first):
    """`base`: params mode interpolates with A = B = 0 (both matrices scale: update w² · B A); delta
    mode adds a zero update (update w · B A, the adapter's rank)."""
    a = trained_adapter(tmp_path, "a", 0, rank=2, alpha=4)
    loras = ["base", str(a)] if base_first else [str(a), "base"]
    weights = [0.4, 0.6] if base_first else [0.6, 0.4]
    (sa, meta_a), da = read_lora(a), delta_weights(a)
    params = soup(loras, weights, str(tmp_path / "params"), mode="params")
    sp, meta_p = read_lora(params.parent)
    assert sp.keys() == sa.keys() and meta_p["lora_alpha"] == meta_a["lora_alpha"] and meta_p["r"] == meta_a["r"]
    for key in sa:
        torch.testing.assert_close(sp[key], 0.6 * sa[key])
    dp = delta_weights(params.parent)
    for key in da:
        torch.testing.assert_close(dp[key], 0.36 * da[key], rtol=1e-5, atol=1e-6)
    delta = soup(loras, weights, str(tmp_path / "delta"), mode="delta")
    dd, (sd, _) = delta_weights(delta.parent), read_lora(delta.parent)
    assert next(v for k, v in sd.items() if k.endswith("down.weight")).shape[0] == 2  # the adapter's rank
    for key in da:
        torch.testing.assert_close(dd[key], 0.6 * da[key], rtol=1e-5, atol=1e-6)
    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(params.parent))


def test_only_base_adapters_are_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        soup(["base", "base"], [0.5, 0.5], str(tmp_path / "mix"))
    assert_one_line(err, "--lora")
    assert not (tmp_path / "mix").exists()
