"""`alignprop soup --sweep`: reward mixing as in the AlignProp paper, swept over α.

    alignprop soup --sweep 0:1:0.1 --lora runs/aesthetic --lora runs/hps --config sd15-aesthetic \\
        --tracking-uri sqlite:////abs/mlflow.db [--experiment NAME] [--prompt "a cat" ...] --out soups/sweep
    alignprop soup --sweep 0:1:0.25 --lora runs/aesthetic --lora base --config tiny-cpu sampling.num_steps=2 ...

For each α of the grid (start, start + step, ..., and always stop: both ends included) the two
adapters are mixed, θ_mix = α θ_1 + (1 − α) θ_2 (`--mode params`, the paper's interpolation of
the A and B matrices, the default for sweeps; `--mode delta`: α ΔW_1 + (1 − α) ΔW_2 exactly), the
mix is loaded into the config's pipeline, the held-out prompts (`--prompt`, default the config's
trainer.eval_prompts) are sampled with the config's sampling settings and one fixed seed (default
trainer.eval_seed: the same noise for every α, as in the trainer's evaluation), and every reward
of `rewards` and `eval_rewards` scores them (mean over prompts). `base` on either side is the zero
adapter (the base model; see alignprop.platform.soup.mix).

One NEW MLflow run per sweep (tag alignprop.kind=soup-sweep) holds: params lora_1, lora_2, mode,
alphas; metrics soup/<label> and soup/alpha at step = index of α; artifacts soup_sweep.csv
(alpha, one column per reward), reward_vs_reward.png (first reward against second, each point
annotated with its α; reward against α when there is only one reward) and samples/alpha_<α>.png
(one grid of the prompts' images per α). The csv, png and sample grids are also written under --out
and the table is printed. Between two αs the adapter is unloaded: the base weights are never
modified (nothing is fused), so every α starts from the exact base model.
"""

from __future__ import annotations

import csv
import math
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..config import ConfigError, RunConfig, to_yaml
from .mix import BASE, MODES, is_base, mix, read_adapters, write_lora
from ...rewards import build_rewards
from ...trainers.families import denoiser_of
from ...trainers.sampling import SamplerSettings, encode_prompts, negative_prompt, sample
from ..console import load_lora_weights
from ..models import load_pipeline
from ..tracking import image_grid, probe_tracking_uri, tracked_run

SWEEP_ACCEPTED = "start:stop:step with 0 <= start < stop <= 1 and step > 0"
MAX_ALPHAS = 1001
ADAPTER_NAME = "soup"
SWEEP_TAG = "alignprop.kind"


def parse_sweep(text: str) -> list[float]:
    """'0:1:0.1' → [0.0, 0.1, ..., 1.0]: start, start + i·step while below stop, then stop itself
    (values rounded to 10 decimals, so 0.30000000000000004 is 0.3). One-line ConfigError."""
    bad = ConfigError(f"--sweep: got {text!r}; accepted: {SWEEP_ACCEPTED}")
    parts = str(text).split(":")
    if len(parts) != 3:
        raise bad
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise bad from None
    if not all(math.isfinite(v) for v in (start, stop, step)) or not (0 <= start < stop <= 1) or step <= 0:
        raise bad
    ratio = (stop - start) / step
    if not math.isfinite(ratio) or ratio + 1 > MAX_ALPHAS:
        raise ConfigError(f"--sweep: got {text!r} (more than {MAX_ALPHAS} values of α); accepted: {SWEEP_ACCEPTED}, "
                          f"at most {MAX_ALPHAS} values")
    count = math.floor(ratio + 1e-9) + 1  # points of start + i·step not past stop
    alphas = [round(start + i * step, 10) for i in range(count)]
    alphas = [a for a in alphas if a < stop - 1e-9]
    return alphas + [round(stop, 10)]


def check_sweep_args(sweep: str, loras: Sequence[str], weights: Optional[Sequence[float]], config: Optional[str],
                     mode: Optional[str]) -> list[float]:
    """Everything checkable from the command line alone (before any file, model or store is touched)."""
    alphas = parse_sweep(sweep)
    if len(loras) != 2:
        raise ConfigError(f"--lora: got {len(loras)} adapters with --sweep; accepted: exactly two (--lora A --lora "
                          f"B; either may be {BASE!r}, the base model)")
    if all(is_base(x) for x in loras):
        raise ConfigError(f"--lora: both adapters are {BASE!r}; accepted: at least one trained adapter beside {BASE!r}")
    if weights:
        raise ConfigError("--weights: not used with --sweep (the weights are α and 1 − α); accepted: --sweep "
                          "start:stop:step alone")
    if not config:
        raise ConfigError("--config: required with --sweep (its pipeline, sampling settings, rewards and eval "
                          "prompts are used); accepted: a preset or a YAML path")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
    return alphas


@contextmanager
def loaded_mix(pipe, state: dict[str, torch.Tensor], meta: dict) -> Iterator[None]:
    """The mixed adapter loaded into `pipe` (as a PEFT adapter, never fused) for the block, then
    unloaded: the LoRA layers are removed and the untouched base layers put back."""
    with tempfile.TemporaryDirectory(prefix="alignprop-soup-") as tmp:
        path = write_lora(state, meta, tmp)
        load_lora_weights(pipe, tmp, path.name, adapter_name=ADAPTER_NAME)  # quiet: no text-encoder keys, expected
    try:
        yield
    finally:
        pipe.unload_lora_weights()


@torch.no_grad()
def render(pipe, cfg: RunConfig, prompts: Sequence[str], seed: int) -> torch.Tensor:
    """The prompts' images (B×3×H×W in [0, 1]) with the config's sampling settings: the trainer's
    evaluation sampler (DDIM, classifier-free guidance, one batch, a CPU generator seeded `seed`)."""
    model = denoiser_of(pipe)
    device = model.device
    embeds = encode_prompts(pipe, prompts, device)
    negative = negative_prompt(pipe, len(prompts), device)
    return sample(pipe, model, embeds, negative, torch.Generator().manual_seed(seed), SamplerSettings.of(cfg.sampling),
                  checkpoint_unet=False).images


def sweep_images(pipe, cfg: RunConfig, adapters, alphas: Sequence[float], mode: str, prompts: Sequence[str],
                 seed: int, progress: bool = True) -> Iterator[tuple[int, float, torch.Tensor]]:
    """(index, α, images) for each α: the mix α θ_1 + (1 − α) θ_2 loaded, sampled, unloaded."""
    from tqdm.auto import tqdm

    for i, alpha in enumerate(tqdm(alphas, desc="soup sweep", unit="α", disable=not progress, file=sys.stderr)):
        state, meta = mix(adapters, [alpha, 1.0 - alpha], mode)
        with loaded_mix(pipe, state, meta):
            images = render(pipe, cfg, prompts, seed)
        yield i, alpha, images


@dataclass
class SweepResult:
    run_id: str
    tracking_uri: str
    labels: list[str]
    rows: list[dict[str, float]] = field(default_factory=list)  # {"alpha": α, label: mean score}
    csv_path: Optional[Path] = None
    plot_path: Optional[Path] = None


def reward_models(cfg: RunConfig, device: torch.device):
    """[(label, reward)] for `rewards` then `eval_rewards` (a label in both: the eval one wins)."""
    named: dict[str, torch.nn.Module] = {}
    for specs in (cfg.rewards, cfg.eval_rewards):
        if specs:
            combo = build_rewards(specs).to(device)
            named.update(zip(combo.labels, combo.rewards))
    return list(named.items())


@torch.no_grad()
def score(rewards, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    return {label: float(reward(images, list(prompts)).float().mean()) for label, reward in rewards}


def format_alpha(alpha: float) -> str:
    return f"{alpha:.4f}".rstrip("0").rstrip(".") if alpha else "0"


def write_csv(rows: Sequence[dict[str, float]], labels: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["alpha", *labels])
        for row in rows:
            writer.writerow([repr(row["alpha"]), *(repr(row[label]) for label in labels)])
    return path


def plot(rows: Sequence[dict[str, float]], labels: Sequence[str], path: Path, title: str) -> Path:
    """First reward (x) against the second (y), one point per α annotated with it; with one reward,
    the reward against α. Matplotlib's Agg canvas: no display, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    alphas = [r["alpha"] for r in rows]
    if len(labels) >= 2:
        xs, ys = [r[labels[0]] for r in rows], [r[labels[1]] for r in rows]
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
    else:
        xs, ys = alphas, [r[labels[0]] for r in rows]
        ax.set_xlabel("α")
        ax.set_ylabel(labels[0])
    ax.plot(xs, ys, "-", color="0.75", zorder=1)
    points = ax.scatter(xs, ys, c=alphas, cmap="viridis", vmin=0, vmax=1, zorder=2)
    for x, y, a in zip(xs, ys, alphas):
        ax.annotate(f"α={format_alpha(a)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(0.12)
    fig.colorbar(points, ax=ax, label="α")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_table(rows: Sequence[dict[str, float]], labels: Sequence[str]) -> str:
    width = max([8, *(len(label) for label in labels)]) + 2
    lines = ["alpha".ljust(8) + "".join(label.rjust(width) for label in labels)]
    for row in rows:
        cells = "".join(f"{row[label]:.6f}".rjust(width) for label in labels)
        lines.append(format_alpha(row["alpha"]).ljust(8) + cells)
    return "\n".join(lines)


def run_soup_sweep(cfg: RunConfig, loras: Sequence[str], lora_names: Sequence[str], alphas: Sequence[float], mode: str,
                   prompts: Sequence[str], seed: int, tracking_uri: str, experiment: str, out: str | Path,
                   sweep_spec: str = "", progress: bool = True) -> SweepResult:
    """The sweep: `loras` are local paths (or `base`), `lora_names` what the user gave (logged).
    Checks everything that needs no model (adapters readable and mixable, store reachable) before
    loading the pipeline; logs to a new MLflow run in `experiment` at the absolute `tracking_uri`."""
    from PIL import Image
    from mlflow import MlflowClient

    adapters = read_adapters(loras)
    mix(adapters, [0.5, 0.5], mode)  # refuses incompatible adapters (params mode: shapes, lora_alpha) now
    probe_tracking_uri(tracking_uri)
    out_dir = Path(out)
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(cfg.model).to(device)
    rewards = reward_models(cfg, device)
    labels = [label for label, _ in rewards]
    params = {"lora_1": lora_names[0], "lora_2": lora_names[1], "mode": mode, "sweep": sweep_spec,
              "alphas": ",".join(format_alpha(a) for a in alphas), "seed": seed, "prompts": " | ".join(prompts),
              "config": cfg.name, "rewards": ",".join(labels)}
    run_name = f"soup-sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # always a new run
    result = SweepResult(run_id="", tracking_uri=tracking_uri, labels=labels)
    with tracked_run(tracking_uri, experiment, run_name, params, to_yaml(cfg),
                     tags={SWEEP_TAG: "soup-sweep"}) as run_id:
        from mlflow.entities import Metric

        result.run_id = run_id
        client = MlflowClient(tracking_uri)
        for i, alpha, images in sweep_images(pipe, cfg, adapters, alphas, mode, prompts, seed, progress):
            means = score(rewards, images, prompts)
            result.rows.append({"alpha": alpha, **means})
            now = int(time.time() * 1000)
            metrics = [Metric("soup/alpha", alpha, now, i)] + [Metric(f"soup/{k}", v, now, i) for k, v in means.items()]
            client.log_batch(run_id, metrics=metrics, synchronous=True)
            grid = samples_dir / f"alpha_{alpha:.4f}.png"
            Image.fromarray(image_grid(images)).save(grid)
            client.log_artifact(run_id, str(grid), "samples")
        result.csv_path = write_csv(result.rows, labels, out_dir / "soup_sweep.csv")
        title = f"{mode} mix: α·{Path(lora_names[0]).name} + (1−α)·{Path(lora_names[1]).name}"
        result.plot_path = plot(result.rows, labels, out_dir / "reward_vs_reward.png", title)
        client.log_artifact(run_id, str(result.csv_path))
        client.log_artifact(run_id, str(result.plot_path))
    return result
