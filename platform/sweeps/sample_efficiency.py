"""The sample-efficiency summary of a sweep that grids over `trainer.algorithm` (and seeds): held-out
reward against images sampled and against training seconds, one line per method (mean ± std over
seeds), and the table "images (and seconds) each method needs to reach the baseline's final
held-out reward". Written to the sweep's MLflow parent run by `summary.summarize`.

    alignprop tune --config toy-count sampling.eta=1.0 --space paper_sample_efficiency

The baseline is DDPO when the grid has it (the paper's comparison), else the grid's first method.
Curves are read back from each trial's MLflow run: the metric at each evaluation step, x = the
`images_seen` / `wall_s` logged at that step (0 at step 0).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ALGORITHM_KEY, SEED_KEY = "trainer.algorithm", "trainer.seed"
AXES = (("images_seen", "images sampled (all ranks)"), ("wall_s", "training seconds"))


def applies(spec) -> bool:
    """Comparison grids: over the algorithm, or over seeds (e.g. K × seed)."""
    return ALGORITHM_KEY in spec.space or SEED_KEY in spec.space


def _group_label(row: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in keys) or "all"


def _grid_position(row: dict[str, Any], keys: list[str], spec) -> tuple:
    """Where a trial's values sit in the space's grid_search lists (the order the user wrote)."""
    position = []
    for key in keys:
        values = spec.space[key].get("values") or spec.space[key].get("categories") or []
        position.append(values.index(row[key]) if row[key] in values else len(values))
    return tuple(position)


def curves(client, children: dict[str, Any], rows: list[dict[str, Any]], spec) -> dict[str, dict[str, np.ndarray]]:
    """group label → {step, metric (seeds × evals), images_seen, wall_s (means over seeds)}."""
    keys = [k for k in spec.space if k != SEED_KEY]
    per_group: dict[str, list[dict[int, tuple[float, float, float]]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: _grid_position(r, keys, spec)):  # groups in the grid's order
        run = children.get(row["trial_id"])
        if run is None or row["status"] == "error":
            continue
        run_id = run.info.run_id
        history = {m.step: m.value for m in client.get_metric_history(run_id, spec.metric)}
        xs = {axis: {m.step: m.value for m in client.get_metric_history(run_id, axis)} for axis, _ in AXES}
        points = {step: (value, xs["images_seen"].get(step, 0.0), xs["wall_s"].get(step, 0.0))
                  for step, value in history.items() if step == 0 or step in xs["images_seen"]}
        if points:
            per_group[_group_label(row, keys)].append(points)
    out = {}
    for label, runs in per_group.items():
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        if steps:
            out[label] = {
                "step": np.array(steps),
                "metric": np.array([[r[s][0] for s in steps] for r in runs]),
                "images_seen": np.array([np.mean([r[s][1] for r in runs]) for s in steps]),
                "wall_s": np.array([np.mean([r[s][2] for r in runs]) for s in steps]),
            }
    return out


def _first_reaching(curve: dict[str, np.ndarray], target: float, mode: str, axis: str) -> float:
    mean = curve["metric"].mean(axis=0)
    hit = mean >= target if mode == "max" else mean <= target
    return float(curve[axis][np.argmax(hit)]) if hit.any() else math.nan


def table(groups: dict[str, dict[str, np.ndarray]], spec) -> tuple[str, list[dict[str, Any]]]:
    """(baseline label, rows): final metric (mean ± std over seeds) and what each method needs to
    reach the baseline's final mean, with ratios to the baseline's own numbers."""
    labels = list(groups)
    baseline = next((label for label in labels if "algorithm=ddpo" in label), labels[0])
    target = float(groups[baseline]["metric"][:, -1].mean())
    base_images = _first_reaching(groups[baseline], target, spec.mode, "images_seen")
    base_seconds = _first_reaching(groups[baseline], target, spec.mode, "wall_s")
    rows = []
    for label in labels:
        curve = groups[label]
        images, seconds = (_first_reaching(curve, target, spec.mode, axis) for axis in ("images_seen", "wall_s"))
        rows.append({"method": label, "seeds": len(curve["metric"]), "final_mean": float(curve["metric"][:, -1].mean()),
                     "final_std": float(curve["metric"][:, -1].std()), "images_to_reach": images,
                     "images_vs_baseline": images / base_images if base_images else math.nan,
                     "seconds_to_reach": seconds,
                     "seconds_vs_baseline": seconds / base_seconds if base_seconds else math.nan})
    return baseline, rows


def reach_matrix(groups: dict[str, dict[str, np.ndarray]], spec) -> list[dict[str, Any]]:
    """Images each method (row) needs to reach each method's (column) final mean: informative
    where the baseline's own final value is no better than the base model's (every method: 0)."""
    finals = {label: float(curve["metric"][:, -1].mean()) for label, curve in groups.items()}
    return [{"method": row,
             **{col: _first_reaching(groups[row], finals[col], spec.mode, "images_seen") for col in groups}}
            for row in groups]


def markdown(baseline: str, rows: list[dict[str, Any]], metric: str, target: float,
             matrix: list[dict[str, Any]] = ()) -> str:
    def num(v, fmt, missing="not reached"):
        return missing if isinstance(v, float) and math.isnan(v) else format(v, fmt)

    lines = [f"Baseline: {baseline}; target = its final mean {metric} = {target:.4g} (0 images: the base model "
             "already scores that; —: no ratio to a baseline that needed 0).", "",
             "| method | seeds | final (mean ± std) | images to reach | × baseline | seconds to reach | × baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seeds']} | {r['final_mean']:.4g} ± {r['final_std']:.2g} | "
                     f"{num(r['images_to_reach'], '.0f')} | "
                     f"{num(r['images_vs_baseline'], '.2f', '—')} | {num(r['seconds_to_reach'], '.0f')} | "
                     f"{num(r['seconds_vs_baseline'], '.2f', '—')} |")
    if matrix:
        columns = [c for c in matrix[0] if c != "method"]
        lines += ["", "Images each method (row) needs to reach each method's final mean (column):", "",
                  "| method | " + " | ".join(f"→ {c}" for c in columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {m['method']} | " + " | ".join(num(m[c], ".0f") for c in columns) + " |" for m in matrix]
    return "\n".join(lines) + "\n"


def plot(groups: dict[str, dict[str, np.ndarray]], spec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(AXES), figsize=(5.2 * len(AXES), 3.6), squeeze=False)
    for ax, (axis, title) in zip(axes[0], AXES):
        for label, curve in groups.items():
            mean, std = curve["metric"].mean(axis=0), curve["metric"].std(axis=0)
            ax.plot(curve[axis], mean, marker="o", markersize=3, label=f"{label} (n={len(curve['metric'])})")
            ax.fill_between(curve[axis], mean - std, mean + std, alpha=0.2)
        ax.set_xlabel(title)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{spec.name}: held-out {spec.metric}, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(client, parent_id: str, children: dict[str, Any], rows: list[dict[str, Any]], spec, tmp: str) -> dict | None:
    """Figure, CSV and markdown table into the parent run (and the table on the console)."""
    import csv

    groups = curves(client, children, rows, spec)
    if not groups:
        return None
    baseline, table_rows = table(groups, spec)
    target = float(groups[baseline]["metric"][:, -1].mean())
    matrix = reach_matrix(groups, spec)
    text = markdown(baseline, table_rows, spec.metric, target, matrix)
    figure, csv_path, md_path = (Path(tmp) / f"sample_efficiency.{suffix}" for suffix in ("png", "csv", "md"))
    plot(groups, spec, figure)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)
    md_path.write_text(text)
    for path in (figure, csv_path, md_path):
        client.log_artifact(parent_id, str(path))
    print(f"\n[tune] sample efficiency ({spec.metric}; sample_efficiency.png in the parent run):\n{text}")
    return {"baseline": baseline, "rows": table_rows, "groups": sorted(groups), "matrix": matrix}
