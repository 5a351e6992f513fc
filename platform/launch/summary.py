"""The closing summary of `alignprop train`: steps, held-out rewards before → after, where the
LoRA and the checkpoint are, and how to open the run in the MLflow UI.

    [alignprop] done: run tiny-cpu-02f14d19, 20 steps
      task: maximise 1 × brightness                                     # from the run's config
      held-out (eval/, step 0 → 20):  brightness 0.5082 → 0.5190 (+0.0108)  ...
      samples: runs:/<id>/eval/samples/step_0000.png → eval/samples/step_0020.png
      LoRA: runs:/<id>/lora/final   checkpoint: /abs/ray_results/<run>/checkpoint_...
      UI: make ui, then http://127.0.0.1:5000/#/experiments/1/runs/<id>
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def held_out_changes(client, run_id: str) -> list[tuple[str, float, float, int, int]]:
    """(name, first, last, first step, last step) of every `eval/` metric of the run."""
    run = client.get_run(run_id)
    rows = []
    for key in sorted(k for k in run.data.metrics if k.startswith("eval/") and not k.endswith("_se")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        if history:
            first, last = history[0], history[-1]
            rows.append((key.removeprefix("eval/"), first.value, last.value, first.step, last.step))
    return rows


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The command and URL that show this run."""
    # MLflow 3.17's UI opens in its GenAI view whatever the experiment's tag says; the URL parameter
    # selects the model-training view.
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    local = f"http://127.0.0.1:5000/{page}"
    repo_db = Path.cwd() / "mlflow.db"
    if tracking_uri == f"sqlite:///{repo_db}" and (Path.cwd() / "Makefile").is_file():
        return f"make ui, then {local}"
    return f"alignprop ui --tracking-uri {tracking_uri}, then {local}"


def task_line(cfg: Any) -> str:
    """What the run maximised and what judged it, from its config; the toy world's count task says
    that its captions name other counts on purpose."""
    def named(reward: dict) -> str:
        target = reward.get("target")
        return reward["name"] + (f" (target {target})" if target is not None else "")

    line = "  task: maximise " + " + ".join(f"{r.get('weight', 1.0):g} × {named(r)}" for r in cfg.rewards)
    if cfg.eval_rewards:
        line += "; judged by " + ", ".join(named(r) for r in cfg.eval_rewards)
    if cfg.trainer.best_metric != "eval/reward_total":
        line += f"; lora/best is chosen on {cfg.trainer.best_metric}"
    counts = [r["target"] for r in cfg.rewards if r["name"] == "toy_count" and r.get("target") is not None]
    if counts:
        line += (f". Draw {counts[0]} object{'s' if counts[0] != 1 else ''} whatever the caption says: the captions "
                 "name other counts on purpose")
    return line


def proxy_gold_lines(client, run_id: str, cfg: Any, changes: dict[str, tuple]) -> list[str]:
    """The trained reward (proxy) beside the metric lora/best is chosen on (gold), with the gold's peak:
    over-optimisation reads off one line (the proxy still rising while the gold fell from its peak)."""
    gold = cfg.trainer.best_metric.removeprefix("eval/")
    proxies = [r.get("label", r["name"]) for r in cfg.rewards if r.get("label", r["name"]) in changes]
    if gold in proxies or gold not in changes or not proxies:
        return []
    history = client.get_metric_history(run_id, cfg.trainer.best_metric)
    peak = max(history, key=lambda m: (m.value, -m.step))
    cell = lambda name: f"{name} {changes[name][1]:.4f} → {changes[name][2]:.4f}"  # noqa: E731
    return [f"  proxy vs gold: {'; '.join(cell(p) for p in proxies)} (trained) | {cell(gold)} (gold; its best "
            f"{peak.value:.4f} at step {peak.step}: lora/best)"]


def closing_summary(outcome: Any, model_uri: Optional[str] = None, registered: Optional[str] = None,
                    cfg: Any = None) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.mlflow_run_id)
    steps = int(outcome.metrics.get("step", 0)) or None
    lines = [f"[alignprop] done: run {outcome.run_name}" + (f", {steps} steps" if steps else "")
             + f", mlflow run {outcome.mlflow_run_id} at {outcome.tracking_uri}"]
    if cfg is not None:
        lines.append(task_line(cfg))
    changes = held_out_changes(client, outcome.mlflow_run_id)
    if changes:
        first, last = changes[0][3], changes[0][4]
        cells = [f"{name} {a:.4f} → {b:.4f} ({b - a:+.4f})" for name, a, b, _, _ in changes]
        lines.append(f"  held-out rewards (eval/, step {first} → {last}): " + "; ".join(cells))
    if cfg is not None and changes and cfg.trainer.best_metric.startswith("eval/"):
        lines.extend(proxy_gold_lines(client, outcome.mlflow_run_id, cfg, {c[0]: c for c in changes}))
    grids = sorted((int(a.path.rsplit("_", 1)[1].removesuffix(".png")), a.path)
                   for a in client.list_artifacts(outcome.mlflow_run_id, "eval/samples") if a.path.endswith(".png"))
    if grids:
        lines.append(f"  samples: runs:/{outcome.mlflow_run_id}/{grids[0][1]}" +
                     (f" → {grids[-1][1]}" if len(grids) > 1 else ""))
    logged = {a.path for a in client.list_artifacts(outcome.mlflow_run_id, "lora")}
    lora = "lora/final" if "lora/final" in logged else None
    if lora:
        lines.append(f"  LoRA: runs:/{outcome.mlflow_run_id}/{lora}"
                     + (f"   MLflow Model: {model_uri}" if model_uri else "")
                     + (f" (registered: {registered})" if registered else ""))
    lines.append(f"[alignprop] last checkpoint: {outcome.checkpoint_path}")
    lines.append(f"  UI: {ui_hint(outcome.tracking_uri, run.info.experiment_id, outcome.mlflow_run_id)}")
    return lines


def print_summary(outcome: Any, cfg: Any = None) -> None:
    try:
        lines = closing_summary(outcome, getattr(outcome, "model_uri", None), getattr(outcome, "registered", None),
                                cfg)
    except Exception as err:  # the run is done; a tracking hiccup must not turn it into an error
        lines = [f"[alignprop] done: run {outcome.run_name}, mlflow run {outcome.mlflow_run_id} at "
                 f"{outcome.tracking_uri}",
                 f"[alignprop] last checkpoint: {outcome.checkpoint_path}", f"  (summary unavailable: {err})"]
    print("\n".join(lines), flush=True)
