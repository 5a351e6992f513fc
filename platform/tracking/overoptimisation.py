"""`overoptimisation.png`, logged to every run whose `trainer.best_metric` is a gold metric (the toy presets'):
the trained reward on the held-out prompts (proxy) beside the gold metric against steps, with the proxy
error, the drift from the base model and the LoRA scales of `trainer.eval_lora_scales`. Reward hacking
reads off it: the proxy still rising while the gold peaked and fell, the proxy error growing.

    log_overoptimisation_plot(uri, run_id, cfg)      # the launcher calls it once the run is done
    draw(uri, run_id, cfg, Path("overoptimisation.png"))   # the same figure into a file
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

PLOT_NAME = "overoptimisation.png"


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in points], [m.value for m in points]


def panels(cfg: Any) -> Optional[dict[str, list[str]]]:
    """{panel title: metric keys} for the run's config, or None where there is no gold beside the proxy."""
    gold = cfg.trainer.best_metric
    proxies = [f"eval/{r.get('label', r['name'])}" for r in cfg.rewards if isinstance(r, dict)]
    if not gold.startswith(("eval/", "val/")) or gold in proxies or gold.endswith("/reward_total"):
        return None
    name = gold.split("/", 1)[1]
    scales = [f"eval_lora{s:g}" for s in cfg.trainer.eval_lora_scales if s != 1.0]
    others = [r.get("label", r["name"]) for r in cfg.eval_rewards if isinstance(r, dict)]
    others = [o for o in others if f"eval/{o}" not in (gold, *proxies) and not o.endswith("_exact")]
    return {"proxy (trained) and gold (selects lora/best)": [*proxies, gold, *(f"{s}/{name}" for s in scales)],
            "what else the prompt asks (eval_rewards)": [*(f"eval/{o}" for o in others),
                                                         *(f"{s}/{o}" for s in scales for o in others)],
            "proxy error and drift": ["eval/proxy_error", "eval/proxy_error_color", "eval/kl_to_base",
                                      "eval/lora_delta_norm", "eval/diversity"]}


def log_overoptimisation_plot(uri: str, run_id: str, cfg: Any) -> Optional[str]:
    """Draw the run's panels and log them as `overoptimisation.png`; None when the config has no gold metric."""
    if panels(cfg) is None:
        return None
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PLOT_NAME
        draw(uri, run_id, cfg, path)
        MlflowClient(uri).log_artifact(run_id, str(path))
    return PLOT_NAME


def draw(uri: str, run_id: str, cfg: Any, path: Path) -> None:
    """The run's panels (`panels(cfg)`, not None) into the PNG file `path`."""
    layout = panels(cfg)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    logged = set(client.get_run(run_id).data.metrics)
    fig, axes = plt.subplots(1, len(layout), figsize=(5.4 * len(layout), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], layout.items()):
        right, color = None, 0
        for key in (k for k in keys if k in logged):
            steps, values = _history(client, run_id, key)
            if key.endswith(("lora_delta_norm", "kl_to_base")):  # other units: one axis on the right
                right = right or ax.twinx()
            target = right if key.endswith(("lora_delta_norm", "kl_to_base")) else ax
            target.plot(steps, values, "--" if key.startswith("eval_lora") else "-", marker="o", markersize=2.5,
                        label=key, color=f"C{color}")
            color += 1
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if right is not None:
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
            right.set_ylabel("drift (right axis)", fontsize=8)
        ax.legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(f"run {client.get_run(run_id).info.run_name}: proxy vs gold (selects {cfg.trainer.best_metric})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
