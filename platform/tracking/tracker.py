"""What rank 0 of the workers logs into the driver's run: metrics (batched), evaluation grids as
artifacts `<prefix>/samples/step_<NNNN>.png` (tiles upscaled to at least 256 px, each prompt under its
image) and LoRA directories. Workers log with `MlflowClient` and an explicit run id, so no global
"active run" state crosses process boundaries.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch


TILE_PX = 256  # evaluation tiles are upscaled (nearest) to at least this many pixels a side


class Tracker:
    """The rank-0 logging helper: every method is a no-op on other ranks or without a run."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], enabled: bool):
        self.run_id = run_id
        self.enabled = bool(enabled and uri and run_id)
        self.client = None
        self.logged_through = -1  # steps up to this one are already in the run: never log them twice
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)
            self.logged_through = last_logged_step(self.client, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-step metrics, once per step: a resumed run replays the steps after its checkpoint
        (deterministically: same values), and the replay of steps already logged is not logged."""
        if not self.enabled or step <= self.logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_image(self, images: torch.Tensor, key: str, step: int, captions: Optional[Sequence[str]] = None) -> None:
        """Log a B×3×H×W [0, 1] batch as one grid, the artifact `<key>/step_<step:04d>.png` (so the UI's
        artifact tree lists them in step order), each
        caption under its tile. Not MLflow's key/step image log: the UI's chart card for those shows
        every param of the run above the image (pushing it out of view) and stores the file as
        `images/<key with ~>+step+N+timestamp+T+<uuid>.png` plus a webp copy."""
        if self.enabled and step > self.logged_through:
            columns = 4 if len(images) <= 16 else 8  # 32 toy-world tiles: 8 × 4, not a 4 × 8 tower
            grid = image_grid(images, captions, columns=columns, min_tile=TILE_PX, gap=4)
            self.client.log_image(self.run_id, grid, artifact_file=f"{key}/step_{step:04d}.png")

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_lora(self, save_fn, artifact_path: str) -> None:
        """`save_fn(dir)` writes the adapter; it lands under `artifact_path` in the run."""
        if self.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                save_fn(tmp)
                self.log_artifacts(tmp, artifact_path)


def last_logged_step(client, run_id: str) -> int:
    """The last step with metrics in the run: -1 if none, 0 if only the base model's evaluation."""
    metrics = client.get_run(run_id).data.metrics
    return int(metrics["step"]) if "step" in metrics else (0 if metrics else -1)


def image_grid(images: torch.Tensor, captions: Optional[Sequence[str]] = None, columns: int = 4,
               min_tile: int = 0, gap: int = 0) -> np.ndarray:
    """B×3×H×W in [0, 1] → one H'×W'×3 uint8 grid, no torchvision needed. Each image is upscaled by
    an integer factor (nearest: the pixels stay visible) to at least `min_tile` px a side (0: as
    sampled), tiles `gap` px apart on white; with `captions`, each one is written (wrapped, at most
    3 lines) under its image."""
    from PIL import Image, ImageDraw, ImageFont

    images = images.detach().float().clamp(0, 1).cpu()
    b, _, h, w = images.shape
    scale = max(1, -(-min_tile // min(h, w)))
    tile_h, tile_w = h * scale, w * scale
    columns = min(columns, b)
    rows = -(-b // columns)
    font = ImageFont.load_default(size=max(14, tile_w // 14))  # Pillow's bundled FreeType font
    lines = [_wrap(text, font, tile_w - 8, max_lines=3) for text in list(captions or [])[:b]]
    lines += [[] for _ in range(b - len(lines))]
    line_h = font.getbbox("Ag")[3] + 4
    band = (max(len(x) for x in lines) * line_h + 8) if any(lines) else 0
    grid = Image.new("RGB", (columns * tile_w + (columns - 1) * gap, rows * (tile_h + band) + (rows - 1) * gap),
                     "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, image in enumerate(pixels):
        r, col = divmod(i, columns)
        x, y = col * (tile_w + gap), r * (tile_h + band + gap)
        grid.paste(Image.fromarray(image).resize((tile_w, tile_h), Image.Resampling.NEAREST), (x, y))
        for n, line in enumerate(lines[i]):
            draw.text((x + 4, y + tile_h + 4 + n * line_h), line, fill="black", font=font)
    return np.asarray(grid)


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; words wider than a line are cut; the last line ends in "..."
    when the text does not fit."""
    lines, line = [], ""
    for word in text.split():
        while font.getlength(word) > width:  # one long word: cut it to lines
            cut = next((k for k in range(len(word) - 1, 0, -1) if font.getlength(word[:k]) <= width), 1)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines
