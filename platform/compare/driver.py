"""`alignprop compare`'s driver: the go/no-go run first (an arm's `go_no_go`: DDPO's 2,048 images in `paper`),
both phases of every arm as `alignprop tune` sweeps, then the report.

    alignprop compare --config toy-count --protocol paper               # ≈ hours on 2 cores; rerun = resume
    alignprop compare --config toy-count --protocol paper --only alignprop,refl
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

from ..launch import init_ray, ray_address, resolved_tracking_uri
from ..sweeps.space import SweepSpec
from ..config import ConfigError
from .protocol import Arm, Protocol, arm_config, choose
from .report import arm_curves, lr_scores, say, write_report


def run_compare(preset: str, overrides: list[str], protocol: Protocol, name: str, only: Optional[str] = None,
                max_concurrent: Optional[int] = None, skip_go_no_go: bool = False) -> dict[str, Any]:
    """The go/no-go runs first (arms with `go_no_go`; a no-go stops here, unless `skip_go_no_go`), then both
    phases for every chosen arm (resuming what is done), then the report in the comparison's own MLflow
    run; returns the report's numbers."""

    arms = choose(only, protocol)
    configs = {arm.name: arm_config(preset, overrides, protocol, arm, name) for arm in arms}  # all checked first
    uri = resolved_tracking_uri(configs[arms[0].name])
    first = configs[arms[0].name]
    # one Ray for every sweep: a second local Ray in this process loses its object-store connection (measured)
    started = init_ray(ray_address(first), first.ray.start_timeout_s)
    try:
        from ..sweeps.tune import run_sweep  # Ray Tune: imported when a comparison runs

        for arm in arms if not skip_go_no_go else ():
            if arm.go_no_go:
                _go_no_go_first(preset, overrides, protocol, arm, name, uri, max_concurrent, run_sweep)
        return _phases(preset, overrides, protocol, name, arms, configs, uri, max_concurrent)
    finally:
        if started:
            import ray

            ray.shutdown()


def _phases(preset: str, overrides: list[str], protocol: Protocol, name: str, arms: list, configs: dict, uri: str,
            max_concurrent: Optional[int]) -> dict[str, Any]:
    from ..sweeps.tune import run_sweep  # Ray Tune: imported when a comparison runs

    val_gold, phase1, chosen, curves = f"val/{protocol.gold}", {}, {}, {}
    for arm in arms:
        phase1[arm.name] = _phase1(arm, configs[arm.name], protocol, uri, name, max_concurrent, run_sweep)
        chosen[arm.name] = max(phase1[arm.name], key=lambda lr: phase1[arm.name][lr]["auc"])
        say(f"{arm.name}: lr {chosen[arm.name]:g} chosen by the validation gold's AUC ("
            + ", ".join(f"{lr:g}: {s['auc']:.4g}" for lr, s in sorted(phase1[arm.name].items())) + ")")
        if arm.rl:  # at the chosen rate, within GO_NO_GO_IMAGES
            say(go_no_go_verdict(arm, phase1[arm.name][chosen[arm.name]]["go_no_go"])[0])
        sweep = f"{name}-{arm.name}-seeds-lr{chosen[arm.name]:g}"  # the rate in the name: a wider grid never mixes
        spec = SweepSpec(name=sweep, metric=val_gold, mode="max", scheduler="none",
                         space={"trainer.seed": {"space": "grid_search", "values": list(protocol.seeds)}})
        say(f"{arm.name}: phase 2, seeds {', '.join(map(str, protocol.seeds))} at lr {chosen[arm.name]:g}")
        run_sweep(arm_config(preset, overrides, protocol, arm, name, lr=chosen[arm.name]), spec, 1, max_concurrent,
                  sweep_name=sweep)
        curves[arm.name] = arm_curves(uri, name, sweep, protocol)
    return write_report(uri, name, protocol, arms, curves, chosen, phase1)


def _go_no_go_first(preset: str, overrides: list[str], protocol: Protocol, arm: Arm, name: str, uri: str,
                    max_concurrent: Optional[int], run_sweep) -> None:
    """One seed-0 run of `arm.go_no_go` images at the grid's middle rate (`<name>-<arm>-gonogo`) before anything
    else is spent: its validation gold must rise by 2 SE, else a one-line error says to raise the budget."""
    lr, val_gold, sweep = sorted(arm.lrs)[len(arm.lrs) // 2], f"val/{protocol.gold}", f"{name}-{arm.name}-gonogo"
    cfg = arm_config(preset, overrides, protocol, replace(arm, budget=arm.go_no_go), name, lr=lr)
    spec = SweepSpec(name=sweep, metric=val_gold, mode="max", scheduler="none",
                     space={"trainer.seed": {"space": "grid_search", "values": [0]}})
    say(f"{arm.name}: go/no-go first: seed 0, lr {lr:g}, {arm.go_no_go} images")
    run_sweep(cfg, spec, 1, max_concurrent, sweep_name=sweep)
    text, go = go_no_go_verdict(arm, lr_scores(uri, name, sweep, val_gold, within=arm.go_no_go)[lr]["go_no_go"])
    say(text)
    if not go:
        raise ConfigError(f"compare: {text}; accepted: a larger Arm.budget and go_no_go for {arm.name} "
                          "(platform/compare/protocol.py), or --skip-go-no-go to spend the budget anyway")


def go_no_go_verdict(arm: Arm, verdict: dict) -> tuple[str, bool]:
    """The go/no-go line and whether to go on: the validation gold rose by ≥ 2 SE within the images."""
    return (f"{arm.name}: go/no-go: validation gold rose {verdict['rise']:+.4g} ({verdict['z']:.1f} SE) within "
            f"{verdict['within']} images: " + ("go" if verdict["go"] else "NO-GO, under 2 SE"), bool(verdict["go"]))


def _phase1(arm: Arm, cfg, protocol: Protocol, uri: str, name: str, max_concurrent: Optional[int],
            run_sweep) -> dict[float, dict[str, Any]]:
    """The arm's lr sweep on seed 0 (`<name>-<arm>-lr`); while the best rate is at an end of the rates tried,
    one more rate beyond it (`beyond`) as its own sweep `<name>-<arm>-lr-ext<i>`, at most `protocol.extend`
    times. A rate whose run diverged (not FINISHED) has no score and ends the extension."""
    val_gold, scores, tried, lrs = f"val/{protocol.gold}", {}, list(arm.lrs), list(arm.lrs)
    for ext in range(protocol.extend + 1):
        sweep = f"{name}-{arm.name}-lr" + (f"-ext{ext}" if ext else "")
        spec = SweepSpec(name=sweep, metric=val_gold, mode="max", scheduler="none",
                         space={"optim.lr": {"space": "grid_search", "values": lrs},
                                "trainer.seed": {"space": "grid_search", "values": [0]}})
        say(f"{arm.name}: phase 1" + (f", extension {ext}" if ext else "")
            + f", lr in {', '.join(f'{v:g}' for v in lrs)} on seed 0, {arm.budget} images each")
        run_sweep(cfg, spec, 1, max_concurrent, sweep_name=sweep)
        scores.update(lr_scores(uri, name, sweep, val_gold, required=ext == 0))
        lr = beyond(tried, {k: v["auc"] for k, v in scores.items()})
        if lr is None or ext == protocol.extend:
            break
        say(f"{arm.name}: the best lr is at an end of the rates tried ({', '.join(f'{v:g}' for v in sorted(tried))}): "
            f"trying {lr:g}")
        tried.append(lr)
        lrs = [lr]
    return scores


def beyond(tried: list[float], aucs: dict[float, float]) -> Optional[float]:
    """The next rate past the end of `tried` where the best-scoring rate sits (None: the best is inside; a rate
    that diverged has no score, so a best rate next to it is inside). Steps on the 1-3-10 ladder (1e-2 → 3e-2 → 1e-1,
    1e-3 → 3e-4); a grid off the ladder keeps its end spacing."""
    grid = sorted(tried)
    if len(grid) < 2 or not aucs:
        return None
    best = max(aucs, key=aucs.get)
    if best not in (grid[0], grid[-1]):
        return None
    up = best == grid[-1]
    exponent = math.floor(math.log10(best) + 1e-9)
    mantissa = round(best / 10 ** exponent, 6)
    if mantissa in (1.0, 3.0):
        step = {(1.0, True): 3.0, (3.0, True): 10 / 3, (1.0, False): 1 / (10 / 3), (3.0, False): 1 / 3}[mantissa, up]
    else:
        step = grid[-1] / grid[-2] if up else grid[0] / grid[1]
    return float(f"{best * step:.6g}")
