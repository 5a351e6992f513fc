"""`alignprop compare`'s driver: both phases of every arm as `alignprop tune` sweeps, then the report.

    alignprop compare --config toy-count --protocol paper               # ≈ hours on 2 cores; rerun = resume
    alignprop compare --config toy-count --protocol paper --only alignprop,refl
"""

from __future__ import annotations

from typing import Any, Optional

from ..launch import init_ray, ray_address, resolved_tracking_uri
from ..sweeps.space import SweepSpec
from .protocol import Protocol, arm_config, choose
from .report import arm_curves, lr_scores, say, write_report


def run_compare(preset: str, overrides: list[str], protocol: Protocol, name: str, only: Optional[str] = None,
                max_concurrent: Optional[int] = None) -> dict[str, Any]:
    """Both phases for every chosen arm (resuming what is done), then the report in the comparison's
    own MLflow run; returns the report's numbers."""

    arms = choose(only, protocol)
    configs = {arm.name: arm_config(preset, overrides, protocol, arm, name) for arm in arms}  # all checked first
    uri = resolved_tracking_uri(configs[arms[0].name])
    first = configs[arms[0].name]
    # one Ray for every sweep: a second local Ray in this process loses its object-store connection (measured)
    started = init_ray(ray_address(first), first.ray.start_timeout_s)
    try:
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
        sweep = f"{name}-{arm.name}-lr"
        spec = SweepSpec(name=sweep, metric=val_gold, mode="max", scheduler="none",
                         space={"optim.lr": {"space": "grid_search", "values": list(arm.lrs)},
                                "trainer.seed": {"space": "grid_search", "values": [0]}})
        say(f"{arm.name}: phase 1, lr in {', '.join(f'{lr:g}' for lr in arm.lrs)} on seed 0, {arm.budget} images each")
        run_sweep(configs[arm.name], spec, 1, max_concurrent, sweep_name=sweep)
        phase1[arm.name] = lr_scores(uri, name, sweep, val_gold)
        chosen[arm.name] = max(phase1[arm.name], key=lambda lr: phase1[arm.name][lr]["auc"])
        say(f"{arm.name}: lr {chosen[arm.name]:g} chosen by the validation gold's AUC ("
            + ", ".join(f"{lr:g}: {s['auc']:.4g}" for lr, s in sorted(phase1[arm.name].items())) + ")")
        if arm.rl:
            verdict = phase1[arm.name][chosen[arm.name]]["go_no_go"]
            say(f"{arm.name}: go/no-go: validation gold rose {verdict['rise']:+.4g} ({verdict['z']:.1f} SE) within "
                f"{verdict['within']} images: {'go' if verdict['go'] else 'NO-GO: raise its budget (Arm.budget)'}")
        sweep = f"{name}-{arm.name}-seeds"
        spec = SweepSpec(name=sweep, metric=val_gold, mode="max", scheduler="none",
                         space={"trainer.seed": {"space": "grid_search", "values": list(protocol.seeds)}})
        say(f"{arm.name}: phase 2, seeds {', '.join(map(str, protocol.seeds))} at lr {chosen[arm.name]:g}")
        run_sweep(arm_config(preset, overrides, protocol, arm, name, lr=chosen[arm.name]), spec, 1, max_concurrent,
                  sweep_name=sweep)
        curves[arm.name] = arm_curves(uri, name, sweep, protocol)
    return write_report(uri, name, protocol, arms, curves, chosen, phase1)
