"""The comparison's report from MLflow: each arm's curves read back from its runs, the ratio table with
bootstrap CIs (ratios.py), rankings at equal images and seconds, `sample_efficiency.png`/`.md`/`.csv`
in the comparison's own MLflow run (role `compare`), the table on the console.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..sweeps.resume import sweep_children
from .protocol import Arm, Protocol
from .ratios import GO_NO_GO_IMAGES, Curve, auc, crosses, go_no_go, ranking, ratio_ci, targets

AXES = (("images_seen", "images sampled"), ("unet_evals", "denoiser evaluations"), ("wall_s", "training seconds"))


def say(line: str) -> None:
    print(f"[compare] {line}", file=sys.stderr, flush=True)


def run_points(client, run_id: str, metrics: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A run's evaluations of `metrics[0]` with the cost axes (0 at step 0) and the other metrics at the
    same steps (NaN where one was not logged); every history is read once."""
    histories = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
                 for key in (*metrics, *(axis for axis, _ in AXES))}
    steps = sorted(s for s in histories[metrics[0]] if s == 0 or s in histories["images_seen"])
    out = {"step": np.array(steps)}
    out.update({key: np.array([values.get(s, 0.0 if key not in metrics else np.nan) for s in steps])
                for key, values in histories.items()})
    return out


def lr_scores(uri: str, experiment: str, sweep: str, val_gold: str, required: bool = True,
              within: int = GO_NO_GO_IMAGES) -> dict[float, dict[str, Any]]:
    """Phase 1: per learning rate, the validation gold's AUC over images and the go/no-go verdict; a sweep
    with no finished trial is an error where `required` (an extension's diverged rate is just unscored)."""
    from mlflow import MlflowClient

    client, scores = MlflowClient(uri), {}
    for run in sweep_children(uri, experiment, sweep).values():
        if run.info.status != "FINISHED":
            continue
        points = run_points(client, run.info.run_id, (val_gold, f"{val_gold}_se"))
        values, errors = points[val_gold], points[f"{val_gold}_se"]
        errors = np.zeros(len(values)) if np.isnan(errors).any() else errors
        scores[float(run.data.params["optim.lr"])] = {
            "auc": auc(points["images_seen"], values), "final": float(values[-1]),
            "go_no_go": go_no_go(points["images_seen"], values, errors, within), "run_id": run.info.run_id}
    if not scores and required:
        raise RuntimeError(f"sweep {sweep}: no finished trial to choose a learning rate from")
    return scores


def arm_curves(uri: str, experiment: str, sweep: str, protocol: Protocol) -> dict[str, dict[str, Curve]]:
    """Phase 2: {gold, proxy} → {axis → Curve over the finished seeds} on the test split (eval/...)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = [r for r in sweep_children(uri, experiment, sweep).values() if r.info.status == "FINISHED"]
    out: dict[str, dict[str, Curve]] = {}
    gold, proxy = f"eval/{protocol.gold}", f"eval/{protocol.proxy}"
    points = [run_points(client, r.info.run_id, (gold, proxy)) for r in runs]
    length = min((len(p["step"]) for p in points), default=0)
    for kind, metric in (("gold", gold), ("proxy", proxy)):
        if length and not any(np.isnan(p[metric][:length]).any() for p in points):
            out[kind] = {axis: Curve(np.array([p[axis][:length] for p in points]),
                                     np.array([p[metric][:length] for p in points])) for axis, _ in AXES}
    return out


def ratio_rows(curves: dict[str, dict[str, dict[str, Curve]]], arms: list[Arm]) -> list[dict[str, Any]]:
    """For every target τ, baseline (an RL or reference arm) and other arm, kind (gold, proxy) and axis: cost_RL(τ) /
    cost_arm(τ) with its CI, only where both cross τ by 2 SE."""
    rows = []
    rl = [a.name for a in arms if a.sets_targets and a.name in curves and "gold" in curves[a.name]]
    others = [a.name for a in arms if not a.sets_targets and a.name in curves and "gold" in curves[a.name]]
    for kind in ("gold", "proxy"):
        present = [n for n in rl + others if kind in curves[n]]
        if not rl or not others or not present:
            continue
        start = float(np.mean([curves[n][kind]["images_seen"].y[:, 0].mean() for n in present]))
        finals = {n: float(curves[n][kind]["images_seen"].y[:, -1].mean()) for n in rl if kind in curves[n]}
        for baseline, final in finals.items():
            if final <= start:  # no target: said in the table, never a ratio
                rows.append({"kind": kind, "target": f"{baseline} final (not above the base model's {start:.3f})",
                             "tau": final, "baseline": baseline, "method": "–", "axis": "–", "ratio": math.nan,
                             "low": math.nan, "high": math.nan, "unreached": math.nan, "numerator": math.nan,
                             "denominator": math.nan, "baseline_crosses": False, "method_crosses": False,
                             "baseline_budget": curves[baseline][kind]["images_seen"].budget(),
                             "method_budget": math.nan})
        for label, tau in targets(finals, start).items():
            for baseline in finals:
                for method in others:
                    if kind not in curves[method]:
                        continue
                    for axis, _ in AXES:
                        numerator, denominator = curves[baseline][kind][axis], curves[method][kind][axis]
                        found = ratio_ci(numerator, denominator, tau)
                        rows.append({"kind": kind, "target": label, "tau": tau, "baseline": baseline,
                                     "method": method, "axis": axis, **found,
                                     "baseline_crosses": crosses(numerator, tau), "method_crosses": crosses(
                                         denominator, tau), "baseline_budget": numerator.budget(),
                                     "method_budget": denominator.budget()})
    return rows


def _cost(value: float, crossed: bool, budget: float) -> str:
    if math.isnan(value) or not crossed:
        return f"not reached within {budget:.0f}"
    return f"{value:.0f}"


def markdown(protocol: Protocol, arms: list[Arm], curves, chosen: dict, phase1: dict, rows: list[dict]) -> str:
    lines = [f"Protocol `{protocol.name}`: gold `{protocol.gold}`, proxy `{protocol.proxy}`; learning rates chosen "
             f"on seed 0 by the validation gold's AUC, reported on seeds {', '.join(map(str, protocol.seeds))} "
             "(test split).", "",
             "| arm | settings | lr (chosen) | validation AUC per lr | seeds | budget (images) | test gold final "
             "(mean ± SE) | proxy final |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        if arm.name not in curves or "gold" not in curves[arm.name]:
            continue
        gold, proxy = curves[arm.name]["gold"]["images_seen"], curves[arm.name].get("proxy", {}).get("images_seen")
        se = gold.standard_error()[-1]
        per_lr = ", ".join(f"{lr:g}: {s['auc']:.3f}" for lr, s in sorted(phase1[arm.name].items()))
        proxy_text = f"{proxy.y[:, -1].mean():.3f}" if proxy is not None else "–"
        lines.append(f"| {arm.name} | {protocol.notes.get(arm.name, '')} | {chosen[arm.name]:g} | {per_lr} | "
                     f"{gold.seeds} | {arm.budget} | {gold.y[:, -1].mean():.3f} ± {se:.3f} | {proxy_text} |")
    for arm in arms:
        verdict = phase1.get(arm.name, {}).get(chosen.get(arm.name), {}).get("go_no_go")
        if arm.rl and verdict:
            lines.append(f"\nGo/no-go ({arm.name}, seed 0, lr {chosen[arm.name]:g}): validation gold "
                         f"{verdict['rise']:+.4f} ({verdict['z']:.1f} SE) within {verdict['within']} images: "
                         f"{'go' if verdict['go'] else 'no-go'}.")
    lines += ["", "Cost of the baseline over the method's to reach τ (95 % bootstrap CI over seeds; a ratio only "
              "where both curves cross τ by 2 SE):", "",
              "| kind | target τ | baseline | method | axis | baseline cost | method cost | ratio [CI] |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "–":
            lines.append(f"| {r['kind']} | {r['target']} | {r['baseline']} | – | – | no target: the baseline did not "
                         "improve on the base model | – | – |")
            continue
        ratio = ("–" if math.isnan(r["ratio"]) else
                 f"{r['ratio']:.2f} [{r['low']:.2f}, {'∞' if math.isinf(r['high']) else format(r['high'], '.2f')}]")
        lines.append(f"| {r['kind']} | {r['target']} = {r['tau']:.3f} | {r['baseline']} | {r['method']} | "
                     f"{r['axis']} | "
                     f"{_cost(r['numerator'], r['baseline_crosses'], r['baseline_budget'])} | "
                     f"{_cost(r['denominator'], r['method_crosses'], r['method_budget'])} | {ratio} |")
    for axis, title in (("images_seen", "images"), ("wall_s", "seconds")):
        gold = {n: c["gold"][axis] for n, c in curves.items() if "gold" in c}
        if gold:
            cost = min(c.budget() for c in gold.values())
            ranked = ranking(gold, cost)
            lines += ["", f"Ranking on test gold at equal {title} ({cost:.0f}): "
                      + "; ".join(f"{n} {m:.3f} ± {s:.3f}" for n, m, s in ranked)]
    return "\n".join(lines) + "\n"


def plot(curves, protocol: Protocol, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kinds = [k for k in ("gold", "proxy") if any(k in c for c in curves.values())]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10.4, 3.6 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        for col, (axis, title) in enumerate((AXES[0], AXES[2])):
            ax = axes[row][col]
            for name, arm in curves.items():
                if kind not in arm:
                    continue
                curve = arm[kind][axis]
                x, mean = curve.mean()
                band = 2 * curve.standard_error()
                ax.plot(x, mean, marker="o", markersize=3, label=f"{name} (n={curve.seeds})")
                ax.fill_between(x, mean - band, mean + band, alpha=0.2)
            budgets = [arm[kind][axis].budget() for arm in curves.values() if kind in arm]
            if budgets and max(budgets) > 10 * min(budgets) > 0:  # 480 beside 6,400 images: a log axis past 0
                ax.set_xscale("symlog", linthresh=min(budgets) / 10)
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(title)
            ax.set_ylabel(f"test {getattr(protocol, kind)} ({kind})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"protocol {protocol.name}: test gold and proxy, mean ± 2 SE over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(uri: str, name: str, protocol: Protocol, arms: list[Arm], curves, chosen: dict,
                 phase1: dict) -> dict[str, Any]:
    """The report into the comparison's MLflow run `<name>` (reopened on a rerun) and on the console."""
    from ..tracking import tracked_run

    rows = ratio_rows(curves, arms)
    text = markdown(protocol, arms, curves, chosen, phase1, rows)
    params = {"compare.protocol": protocol.name, "compare.arms": ",".join(a.name for a in arms),
              **{f"compare.{arm}.lr": lr for arm, lr in chosen.items()}}
    with tempfile.TemporaryDirectory() as tmp, tracked_run(uri, name, name, params, json.dumps(params),
                                                           {"alignprop.role": "compare"}) as run_id:
        from mlflow import MlflowClient

        figure, table, md = (Path(tmp) / f"sample_efficiency.{suffix}" for suffix in ("png", "csv", "md"))
        plot(curves, protocol, figure)
        md.write_text(text)
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kind"])
            writer.writeheader()
            writer.writerows(rows)
        client = MlflowClient(uri)
        for path in (figure, table, md):
            client.log_artifact(run_id, str(path))
    say(f"report in MLflow run {run_id} ({uri}): sample_efficiency.png, .md, .csv\n{text}")
    return {"run_id": run_id, "chosen": chosen, "rows": rows, "markdown": text}
