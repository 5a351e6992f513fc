"""End of a sweep: results table (printed, CSV), metric-vs-parameter plot, best trial and its LoRA,
all logged to the MLflow parent run (the rows come from our records: sweeps/resume.py). Grids over
`trainer.algorithm` (or seeds) also get the sample-efficiency figure and table
(platform/sweeps/sample_efficiency.py)."""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from . import sample_efficiency
from .resume import PROXY_KEY
from .space import SweepSpec
from ..mlflow_model import log_run_model, register_model, run_model


def _sorted(rows: list[dict[str, Any]], spec: SweepSpec) -> list[dict[str, Any]]:
    """Best first; trials without the metric last."""
    sign = -1 if spec.mode == "max" else 1
    def order(row):  # NaN last
        value = row[spec.metric]
        return math.isnan(value), sign * (0 if math.isnan(value) else value)

    return sorted(rows, key=order)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def cell(v):
        return f"{v:.5g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row[c]).ljust(w) for c, w in zip(columns, widths)))


def _plot(rows: list[dict[str, Any]], spec: SweepSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ok = [r for r in rows if not math.isnan(r[spec.metric]) and r[key] is not None]
        xs = [r[key] if isinstance(r[key], (int, float)) else str(r[key]) for r in ok]
        ax.scatter(xs, [r[spec.metric] for r in ok],
                   c=["tab:blue" if r["status"] == "complete" else "tab:orange" for r in ok])
        if spec.space[key]["space"] == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
    fig.suptitle(f"{spec.name}: {spec.metric} per trial (orange: stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(rows: list[dict[str, Any]], spec: SweepSpec, uri: str, parent_id: str, concurrency: int,
              register_as: Optional[str] = None) -> dict:
    """`rows`: one per trial of the sweep (resume.summary_rows), from our records."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    rows = _sorted(rows, spec)
    # the sweep's metric (a gold one, trainer.best_metric) beside the trained reward's held-out value (the proxy)
    columns = ["trial_id", "status", "steps", spec.metric, *([PROXY_KEY] if spec.metric != PROXY_KEY else []),
               *spec.space]
    print(f"\n[tune] {len(rows)} trials, up to {concurrency} at a time, sorted by {spec.metric} ({spec.mode}):")
    _print_table(rows, columns)
    children = _child_runs(client, parent_id)
    best = next((r for r in rows if r["status"] != "error" and not math.isnan(r[spec.metric])), None)
    with tempfile.TemporaryDirectory() as tmp:
        with open(Path(tmp) / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: r[c] for c in columns} for r in rows)
        _plot(rows, spec, Path(tmp) / "metric_vs_params.png")
        client.log_artifact(parent_id, str(Path(tmp) / "results.csv"))
        client.log_artifact(parent_id, str(Path(tmp) / "metric_vs_params.png"))
        if best is not None and best["trial_id"] in children:
            _export_best(client, uri, parent_id, children[best["trial_id"]], best, spec, tmp, register_as)
        efficiency = None
        if sample_efficiency.applies(spec):  # comparison grids: reward vs images and seconds
            efficiency = sample_efficiency.write(client, parent_id, children, rows, spec, tmp)
    client.log_metric(parent_id, "sweep/trials", len(rows))
    client.log_metric(parent_id, "sweep/concurrency", concurrency)
    return {"rows": rows, "best": best, "parent_run_id": parent_id, "concurrency": concurrency,
            "sample_efficiency": efficiency}


def closing_lines(summary: dict, spec: SweepSpec) -> list[str]:
    """`alignprop tune`'s closing summary: the trials' outcomes, the best trial, its metric and params,
    where its LoRA and MLflow Model are, and how to open the sweep in the MLflow UI."""
    from mlflow import MlflowClient

    from ..launch.summary import ui_hint

    uri, name = summary["tracking_uri"], summary["name"]
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    rows = summary["rows"]
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in ("complete", "stopped", "error")
                       if any(r["status"] == s for r in rows))
    lines = [f"[tune] done: sweep {name}, {len(rows)} trials ({counts}), parent run {parent.info.run_id} at {uri}"]
    best, child_id = summary["best"], parent.data.tags.get("alignprop.best_run_id")
    if best is None or child_id is None:
        lines.append("  best: none (no trial reported the metric)")
    else:
        params = ", ".join(f"{k}={best[k]}" for k in spec.space)
        lines.append(f"  best: trial {best['trial_id']} ({params}): {spec.metric} {best[spec.metric]:.5g} "
                     f"after {best['steps']} steps")
        model = f"   MLflow Model: runs:/{child_id}/model" if run_model(client, child_id) is not None else ""
        registered = parent.data.tags.get("alignprop.registered")
        lines.append(f"  LoRA: runs:/{parent.info.run_id}/best_lora (from run {child_id}){model}"
                     + (f" (registered: {registered})" if registered else ""))
    lines.append(f"  UI: {ui_hint(uri, parent.info.experiment_id, parent.info.run_id)}")
    return lines


def close_child_runs(uri: str, parent_id: str, status: str) -> None:
    """End the sweep's child runs still marked RUNNING (their trials die with an interrupted sweep)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for run in _child_runs(client, parent_id).values():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)


def _child_runs(client, parent_id: str) -> dict[str, Any]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.data.tags.get("alignprop.trial_id"): run for run in runs}


def _export_best(client, uri: str, parent_id: str, child, best: dict, spec: SweepSpec, tmp: str,
                 register_as: Optional[str]) -> None:
    """Tag the best child, copy its config and best LoRA onto the parent; with `register_as`,
    register the child's MLflow Model (`runs:/<child>/model`, alias `best`), first logging one
    from its `lora/final` (or `lora/best`) if the trial has none (ASHA stopped it)."""
    import mlflow.artifacts

    client.set_tag(child.info.run_id, "alignprop.best", "true")
    client.set_tag(parent_id, "alignprop.best_trial_id", best["trial_id"])
    client.set_tag(parent_id, "alignprop.best_run_id", child.info.run_id)
    client.log_metric(parent_id, f"best/{spec.metric}", best[spec.metric])
    config = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="config.yaml", dst_path=tmp,
                                                 tracking_uri=uri)
    client.log_text(parent_id, Path(config).read_text(), "best_config.yaml")
    logged = {a.path for a in client.list_artifacts(child.info.run_id, "lora")}
    lora = "lora/best" if "lora/best" in logged else "lora/final"
    local = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path=lora,
                                                dst_path=str(Path(tmp) / "lora"), tracking_uri=uri)
    client.log_artifacts(parent_id, local, "best_lora")
    if register_as:
        child_id = child.info.run_id
        if run_model(client, child_id) is None:
            final = any(a.path == "lora/final" for a in client.list_artifacts(child_id, "lora"))
            log_run_model(uri, child_id, lora="lora/final" if final else lora)
        registered = register_model(uri, register_as, child_id)
        client.set_tag(parent_id, "alignprop.registered", registered)
        print(f"[tune] registered {registered} (alias best): the Model of trial {best['trial_id']}")
