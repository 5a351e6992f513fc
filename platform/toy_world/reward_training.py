"""Train the toy world's learned reward models on the generator's ground truth.

    alignprop toy-world build-rewards [DIR] --seed 0 --budget-min 3    # → DIR/rewards/toy_{count,color}.safetensors

`toy_count` predicts a density map whose sum is the number of objects (target: one unit of mass
per object, a Gaussian on its centre, as crowd-counting models do); `toy_color` predicts, per 2×2 cell, which palette
colour (or the
background) covers it (target: the exact coverage of the drawn shapes). Both see toy images from
every caption plus 5 % blank ones, a quarter of them passed through the pipeline's VAE (encode, decode:
what decoded samples look like), with noise and a small colour cast. Like the paper's detector and
aesthetic predictors they are imperfect judges: optimised against, they can be fooled, which the
analytic judge (`toy_count_exact`, `toy_color_match`) shows. DIR defaults to the shipped pipeline;
the weights are fp16 safetensors with their sha256 in DIR/BUILD.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .scenes import BACKGROUNDS, COLOURS, SIZE, all_captions, batch, shown_path
from .pretrain import file_rows, file_table, load_toy_pipeline, write_build_section
from ...rewards.toy import ToyNet, colour_probs, count_density

BLANK_SHARE = 0.05
BLOB_SIGMA_PX = 2.0  # spread of one object's count mass around its centre
VAE_SHARE = 0.25


@dataclass
class Batch:
    images: torch.Tensor  # B×3×32×32 in [0, 1]
    density: torch.Tensor  # B×16×16, sums to the object count
    coverage: torch.Tensor  # B×(colours + 1)×16×16 soft labels, background last


def ground_truth(seed: list[int], n: int) -> Batch:
    """Toy images with per-cell count density and colour coverage from the generator's truth."""
    scenes, images = batch(seed, n, all_captions())
    rng = np.random.default_rng(seed + [1])
    blank = rng.random(n) < BLANK_SHARE
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    density = torch.zeros(n, SIZE // 2, SIZE // 2)
    coverage = torch.zeros(n, len(COLOURS) + 1, SIZE // 2, SIZE // 2)
    for i, scene in enumerate(scenes):
        bg = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32)[:, None, None] / 255
        if blank[i]:
            x[i] = bg.expand(3, SIZE, SIZE)
            coverage[i, -1] = 1
            continue
        colour = torch.tensor(COLOURS[scene.caption_.colour], dtype=torch.float32)[:, None, None] / 255
        alpha = ((x[i] - bg).abs().sum(0) / (colour - bg).abs().sum(0)).clamp(0, 1)  # exact for a blend
        cells = F.avg_pool2d(alpha[None, None], 2)[0, 0]
        coverage[i, list(COLOURS).index(scene.caption_.colour)] = cells
        coverage[i, -1] = 1 - cells
        for x0, y0, side in scene.boxes:
            density[i] += _blob(x0 + side / 2, y0 + side / 2)
    return Batch(x, density, coverage)


def _blob(cx: float, cy: float) -> torch.Tensor:
    """One unit of count mass: a Gaussian (σ = 1 cell) on the 16×16 grid of 2×2 cells, centred on
    an object's centre (x, y in pixels) and normalised to sum 1 (crowd-counting's density target)."""
    centres = torch.arange(SIZE // 2, dtype=torch.float32) * 2 + 1.0  # cell centres in pixels
    g = torch.exp(-((centres[None, :] - cx) ** 2 + (centres[:, None] - cy) ** 2) / (2 * BLOB_SIGMA_PX ** 2))
    return g / g.sum()


def augment(x: torch.Tensor, vae, generator: torch.Generator) -> torch.Tensor:
    """A quarter through the VAE (what decoded samples look like), then noise and a small colour cast."""
    n = len(x)
    through = torch.rand(n, generator=generator) < VAE_SHARE
    if through.any() and vae is not None:
        with torch.no_grad():
            latents = vae.encode(x[through] * 2 - 1).latent_dist.mean
            x = x.clone()
            x[through] = (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)
    cast = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.04
    return (x + cast + noise).clamp(0, 1)


def _losses(count_net: ToyNet, colour_net: ToyNet, x: torch.Tensor, truth: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    density = count_density(count_net, x)
    count_loss = F.smooth_l1_loss(density.sum((1, 2)), truth.density.sum((1, 2)))
    count_loss = count_loss + 100 * F.mse_loss(density, truth.density)
    log_probs = colour_net(x).log_softmax(1)
    colour_loss = -(truth.coverage * log_probs).sum(1).mean()
    return count_loss, colour_loss


def train_rewards(directory: str | Path, seed: int = 0, budget_min: float = 3.0, batch_size: int = 64) -> str:
    """Train both CNNs for `budget_min` minutes, save fp16 safetensors, record them in BUILD.md;
    returns a summary (held-out error of each on fresh VAE-decoded images)."""
    out = Path(directory)
    vae = load_toy_pipeline(out).vae if (out / "model_index.json").exists() else None
    torch.manual_seed(seed)
    count_net, colour_net = ToyNet(1), ToyNet(len(COLOURS) + 1)
    with torch.no_grad():  # start near an empty map (softplus(0) in 256 cells counts ~177), still on the slope
        count_net.body[-1].bias.fill_(-4.0)
    opt = torch.optim.AdamW([*count_net.parameters(), *colour_net.parameters()], lr=2e-3, weight_decay=1e-4)
    start, step = time.monotonic(), 0
    with tqdm(total=round(budget_min * 60), unit="s", mininterval=1.0,
              bar_format="reward models {percentage:3.0f}%|{bar}| {n}/{total} s{postfix}") as bar:
        while time.monotonic() - start < budget_min * 60:
            truth = ground_truth([seed, 11, step], batch_size)
            x = augment(truth.images, vae, torch.Generator().manual_seed(seed * 1_000_003 + step))
            count_loss, colour_loss = _losses(count_net, colour_net, x, truth)
            opt.zero_grad(set_to_none=True)
            (count_loss + colour_loss).backward()
            opt.step()
            step += 1
            bar.set_postfix_str(f"step {step}, count loss {count_loss.item():.4f}, colour loss "
                                f"{colour_loss.item():.4f}", refresh=False)
            bar.update(min(bar.total, round(time.monotonic() - start)) - bar.n)
    rows = _save(out, count_net, colour_net)
    minutes = (time.monotonic() - start) / 60
    summary = f"{step} steps × {batch_size} in {minutes:.1f} min; " + heldout_errors(count_net, colour_net, vae, seed)
    _record(out, rows, summary, seed, budget_min)
    return summary


@torch.no_grad()
def heldout_errors(count_net: ToyNet, colour_net: ToyNet, vae, seed: int, n: int = 512) -> str:
    truth = ground_truth([seed, 12], n)
    x = augment(truth.images, vae, torch.Generator().manual_seed(seed + 12))
    count = count_density(count_net, x).sum((1, 2))
    exact = (count.round() == truth.density.sum((1, 2)).round()).float().mean()
    mae = (count - truth.density.sum((1, 2))).abs().mean()
    share = colour_probs(colour_net, x).mean((2, 3))
    share_err = (share - truth.coverage.mean((2, 3))).abs()[:, :-1].sum(1).mean()
    return (f"held-out images: count MAE {mae:.3f}, rounded count exact {exact:.1%}; "
            f"colour shares mean |error| {share_err:.3f} (sum over colours)")


def _save(out: Path, count_net: ToyNet, colour_net: ToyNet) -> list[dict]:
    folder = out / "rewards"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, net in (("toy_count", count_net), ("toy_color", colour_net)):
        paths.append(folder / f"{name}.safetensors")
        save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(paths[-1]))
    return file_rows(out, paths)


def _record(out: Path, rows: list[dict], summary: str, seed: int, budget_min: float) -> None:
    """Write (or replace) the reward models' section of DIR/BUILD.md."""
    command = f"alignprop toy-world build-rewards {shown_path(out)} --seed {seed} --budget-min {budget_min:g}"
    write_build_section(out, "Reward models", f"`{command}`: {summary}\n\n{file_table(rows)}", "Toy world")
