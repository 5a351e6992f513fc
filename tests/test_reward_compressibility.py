"""JPEG compressibility: the true PIL size and the differentiable estimate that tracks it (CPU)."""

import io
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignprop.rewards.compressibility import Compressibility, jpeg_size_bytes


def spearman(a, b) -> float:
    ra = torch.as_tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.as_tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pink_noise(g, size, exponent=1.0):
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    f = (fx ** 2 + fy ** 2).sqrt().clamp(min=1.0 / size)
    spec = torch.complex(torch.randn(3, size, size // 2 + 1, generator=g),
                         torch.randn(3, size, size // 2 + 1, generator=g)) / f ** exponent
    x = torch.fft.irfft2(spec, s=(size, size))
    return (x - x.mean()) / x.std()


def smoothed_noise(g, size, sigma):
    x = torch.randn(1, 3, size, size, generator=g)
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="circular"), k, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="circular"), k.transpose(2, 3), groups=3)
    return (x[0] - x.mean()) / x.std()


def synthetic_images(size=64, seed=0):
    """A varied set (≈ 50 images): noise textures, flat colours, gradients, patterns, mixes."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    colour = lambda: rand(3, 1, 1)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for exponent in (0.5, 1.0, 1.5, 2.0):  # 1/f^e noise: rough to very smooth, two contrasts
        for amp in (0.08, 0.2):
            out.append(colour() * 0.5 + 0.25 + amp * pink_noise(g, size, exponent))
    for sigma in (0.7, 2.0, 5.0):
        for amp in (0.05, 0.15):
            out.append(colour() * 0.5 + 0.25 + amp * smoothed_noise(g, size, sigma))
    for amp in (0.01, 0.03, 0.1, 0.3, 1.0):  # white noise
        out.append(0.5 + amp * (rand(3, size, size) - 0.5))
    out.append(rand(1, size, size).expand(3, -1, -1))  # grey white noise
    for _ in range(3):  # flat colours
        out.append(colour().expand(3, size, size))
    for _ in range(2):  # linear gradients at an angle, radial gradients
        a = rand(1) * math.pi
        t = (xx * torch.cos(a) + yy * torch.sin(a)).clamp(0, 1)
        out.append(colour() * (1 - t) + colour() * t)
        r = ((xx - rand(1)) ** 2 + (yy - rand(1)) ** 2).sqrt().clamp(0, 1)
        out.append(colour() * (1 - r) + colour() * r)
    for period in (2, 4, 8, 16, 32):  # stripes and checkerboards
        cells = (torch.arange(size) // (period // 2)) % 2
        out.append(torch.where(cells.view(1, 1, -1).bool(), colour(), colour()).expand(3, size, size))
        board = (cells.view(-1, 1) + cells.view(1, -1)) % 2
        out.append(torch.where(board.bool(), colour(), colour()))
    for amp in (0.02, 0.06, 0.15):  # gradient + noise
        out.append(colour() * (1 - xx) + colour() * xx + amp * (rand(3, size, size) - 0.5))
        out.append(colour() * (1 - yy) + colour() * yy + amp * pink_noise(g, size, 1.0))
    for amp in (0.05, 0.2):  # stripes + noise, half flat / half noise
        cells = ((torch.arange(size) // 4) % 2).view(1, -1).float()
        out.append(0.3 + 0.4 * cells + amp * (rand(3, size, size) - 0.5))
        half = (xx < 0.5).float()
        out.append(colour() * half + (1 - half) * (0.5 + amp * pink_noise(g, size, 0.5)))
    return torch.stack(out).clamp(0, 1)


@pytest.fixture(scope="module")
def pipeline_images():
    """8 samples of the project's tiny pipeline (32×32, 4 steps)."""
    from alignprop.platform.models import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        x = pipe(["a cat", "a dog", "a tree", "the sea"] * 2, num_inference_steps=4, height=32, width=32,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    return x.float().clamp(0, 1)


def upsample(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def reward():
    return Compressibility().freeze()


def test_jpeg_size_matches_pil():
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    sizes = jpeg_size_bytes(x)
    assert sizes.shape == (2,)
    for image, size in zip(x, sizes):
        buffer = io.BytesIO()
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        assert int(size) == len(buffer.getvalue())
    assert jpeg_size_bytes(x, quality=30).lt(sizes).all()
    assert jpeg_size_bytes(x, subsample=False).gt(sizes).all()


def estimate_vs_true(reward, images, **jpeg):
    with torch.no_grad():
        estimate = -reward(images, [""] * len(images)) * 1000
    true = jpeg_size_bytes(images, **jpeg)
    return spearman(estimate, true), ((estimate - true).abs() / true).median().item()


def test_estimate_tracks_true_size(reward, pipeline_images):
    images = torch.cat([synthetic_images(64, seed=100), upsample(pipeline_images, 64)])
    assert len(images) >= 40
    rho, err = estimate_vs_true(reward, images)
    print(f"\n[compressibility] 64×64, {len(images)} images (synthetic + tiny pipeline): Spearman {rho:.4f}, "
          f"median |relative error| {err:.3f}")
    assert rho >= 0.95 and err < 0.1

    big = torch.cat([synthetic_images(512, seed=101)[::3], upsample(pipeline_images[:2], 512)])
    rho, err = estimate_vs_true(reward, big)
    print(f"[compressibility] 512×512, {len(big)} images: Spearman {rho:.4f}, median |relative error| {err:.3f}")
    assert rho >= 0.95 and err < 0.1


def test_other_settings_track_true_size():
    images = synthetic_images(64, seed=102)
    for quality, subsample in ((50, True), (95, False)):
        reward = Compressibility(quality=quality, subsample=subsample).freeze()
        rho, err = estimate_vs_true(reward, images, quality=quality, subsample=subsample)
        print(f"\n[compressibility] quality {quality}, subsample {subsample}: Spearman {rho:.4f}, "
              f"median |relative error| {err:.3f}", end="")
        assert rho >= 0.95
    with pytest.raises(ValueError, match="temperature"):
        Compressibility(temperature=0)


def test_shape_batch_and_gradient(reward):
    # noise, smoothed noise, white noise, a flat colour, stripes, gradient + noise; 44: not a multiple of 8
    x = synthetic_images(44, seed=3)[[0, 9, 17, 21, 30, 40]].requires_grad_(True)
    scores = reward(x, [""] * 6)
    assert scores.shape == (6,) and scores.isfinite().all()
    singles = torch.cat([reward(x[i:i + 1], [""]) for i in range(6)])
    torch.testing.assert_close(scores, singles, rtol=1e-5, atol=1e-6)
    scores.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    assert (x.grad.flatten(1).abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("hard_forward", [True, False])
def test_gradient_ascent_makes_jpeg_smaller(hard_forward):
    """The reward is useful for optimisation: 20 Adam steps on the pixels shrink the real JPEG."""
    reward = Compressibility(hard_forward=hard_forward).freeze()
    g = torch.Generator().manual_seed(5)
    start = (0.5 + 0.15 * pink_noise(g, 64, 0.5) + 0.1 * (torch.rand(3, 64, 64, generator=g) - 0.5)).clamp(0, 1)[None]
    x = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=0.01)
    for _ in range(20):
        optimiser.zero_grad()
        (-reward(x, [""]).sum()).backward()
        optimiser.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    before, after = jpeg_size_bytes(start).item(), jpeg_size_bytes(x).item()
    print(f"\n[compressibility] hard_forward={hard_forward}: 20 Adam steps (lr 0.01 on pixels), JPEG "
          f"{before:.0f} → {after:.0f} bytes, estimate {-1000 * reward(x, ['']).item():.0f}, "
          f"pixel RMSE {(x - start).pow(2).mean().sqrt().item():.3f}")
    assert after < 0.85 * before


def test_timing_512(reward):
    x = torch.rand(1, 3, 512, 512, requires_grad=True)
    reward(x, [""]).sum().backward()  # warm-up
    x.grad = None
    t0 = time.perf_counter()
    reward(x, [""]).sum().backward()
    print(f"\n[compressibility] CPU forward+backward, 1×3×512×512: {1000 * (time.perf_counter() - t0):.0f} ms "
          f"({torch.get_num_threads()} thread(s))")
    assert x.grad.isfinite().all()
