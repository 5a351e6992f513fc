"""The comparison's arithmetic on learning curves, no I/O: when a method's curve reaches a target, the
cost ratio of two methods at a target with a bootstrap confidence interval over seeds, and rankings at
equal cost.

A curve is one method's evaluations: `x` (cost: images, denoiser evaluations or seconds; one row per
seed, since seconds differ by seed) and `y` (the metric, seeds × evaluations, higher is better).

    curve = Curve(x=np.array([[0, 64, 128]] * 2), y=np.array([[0.1, 0.3, 0.5], [0.1, 0.2, 0.6]]))
    reach(curve, 0.4)                      # cost where the seed-mean first reaches 0.4 (linear between points)
    crosses(curve, 0.4)                    # ... and only if mean − 2 SE reaches it there or later
    ratio_ci(rl, alignprop, 0.4)           # cost_rl / cost_alignprop, 95 % bootstrap CI over seeds

A target that a curve never reaches (by 2 SE) gives NaN: the report says "not reached within B" and
never turns it into a ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

GO_NO_GO_IMAGES = 2000  # the RL go/no-go: has seed 0's validation gold risen by 2 SE within this many images?
BOOTSTRAP_SAMPLES = 2000
CI_LEVEL = 0.95


@dataclass
class Curve:
    x: np.ndarray  # seeds × evaluations (cost at each evaluation; the same grid of steps for every seed)
    y: np.ndarray  # seeds × evaluations

    @property
    def seeds(self) -> int:
        return len(self.y)

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x.mean(axis=0), self.y.mean(axis=0)

    def standard_error(self) -> np.ndarray:
        """Over seeds (ddof 1); 0 with one seed, which then cannot cross a target by 2 SE unless exactly."""
        if self.seeds < 2:
            return np.zeros(self.y.shape[1])
        return self.y.std(axis=0, ddof=1) / math.sqrt(self.seeds)

    def budget(self) -> float:
        """The cost every seed reached (seconds differ by seed)."""
        return float(self.x[:, -1].min())

    def take(self, rows: np.ndarray) -> "Curve":
        return Curve(self.x[rows], self.y[rows])


def first_crossing(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """The first x where y reaches `target`, linear between evaluations; x[0] if y starts there; NaN if never."""
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(y)):
        if y[i] >= target:
            share = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + share * (x[i] - x[i - 1]))
    return math.nan


def reach(curve: Curve, target: float) -> float:
    """Cost at which the mean over seeds first reaches `target` (NaN: not within the budget)."""
    return first_crossing(*curve.mean(), target)


def crosses(curve: Curve, target: float, z: float = 2.0) -> bool:
    """Whether the curve reaches `target` beyond noise: mean − z·SE over seeds reaches it at some evaluation."""
    _, mean = curve.mean()
    return bool(np.any(mean - z * curve.standard_error() >= target))


def ratio_ci(numerator: Curve, denominator: Curve, target: float, samples: int = BOOTSTRAP_SAMPLES,
             seed: int = 0) -> dict[str, float]:
    """cost_numerator(τ) / cost_denominator(τ) and its percentile bootstrap CI over seeds (each method's
    seeds resampled with replacement). NaN ratio unless both curves cross τ by 2 SE; `unreached`: the
    share of bootstrap draws in which one of them does not reach τ at all (those count as +∞, so a CI
    bound that falls among them is +∞: the data cannot bound it)."""
    out = {"ratio": math.nan, "low": math.nan, "high": math.nan, "unreached": math.nan,
           "numerator": reach(numerator, target), "denominator": reach(denominator, target)}
    if not (crosses(numerator, target) and crosses(denominator, target)):
        return out
    out["ratio"] = _ratio(out["numerator"], out["denominator"])
    rng = np.random.default_rng(seed)
    draws = np.empty(samples)
    for i in range(samples):
        a = numerator.take(rng.integers(0, numerator.seeds, numerator.seeds))
        b = denominator.take(rng.integers(0, denominator.seeds, denominator.seeds))
        draws[i] = _ratio(reach(a, target), reach(b, target))
    unreached = np.isnan(draws)
    draws[unreached] = math.inf
    tail = (1 - CI_LEVEL) / 2
    out["low"], out["high"] = (float(np.quantile(draws, q)) for q in (tail, 1 - tail))
    out["unreached"] = float(unreached.mean())
    return out


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if b == 0:
        return math.inf if a > 0 else 1.0  # both at the start: equal; only the denominator at 0: unbounded
    return a / b


def targets(rl_finals: dict[str, float], start: float, levels: tuple[float, ...] = (1 / 3, 2 / 3)) -> dict[str, float]:
    """The targets τ: each RL baseline's final mean, and `levels` of the way from the base model's value
    (`start`) to the lowest of those finals that is above it. A final at or below the base model's is no
    target (every method "reaches" it with 0 images): it is left out, and so are the levels if none is above."""
    above = {name: value for name, value in rl_finals.items() if value > start}
    out = {f"{name} final": value for name, value in above.items()}
    if above:
        lowest = min(above, key=above.get)
        for level in levels:
            out[f"{level:.0%} of the way to {lowest}"] = start + level * (above[lowest] - start)
    return out


def value_at(curve: Curve, cost: float) -> tuple[float, float]:
    """(mean, SE) over seeds of the metric at `cost`, linear between evaluations; NaN beyond the budget."""
    values = []
    for x, y in zip(curve.x, curve.y):
        values.append(float(np.interp(cost, x, y)) if x[0] <= cost <= x[-1] else math.nan)
    values = np.array(values)
    if np.isnan(values).any():
        return math.nan, math.nan
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


def ranking(curves: dict[str, Curve], cost: Optional[float] = None) -> list[tuple[str, float, float]]:
    """Methods by their metric at one cost, best first: [(method, mean, SE)]; `cost` None: the smallest
    budget among them (every method is inside its budget there)."""
    cost = min(c.budget() for c in curves.values()) if cost is None else cost
    rows = [(name, *value_at(curve, cost)) for name, curve in curves.items()]
    return sorted(rows, key=lambda row: -row[1] if not math.isnan(row[1]) else math.inf)


def auc(images: np.ndarray, values: np.ndarray) -> float:
    """Area under a curve per image (its mean height over the budget, trapezoids)."""
    if len(images) < 2 or images[-1] <= images[0]:
        return float(values[-1]) if len(values) else -math.inf
    return float(np.trapezoid(values, images) / (images[-1] - images[0]))


def go_no_go(images: np.ndarray, values: np.ndarray, errors: np.ndarray, within: int = GO_NO_GO_IMAGES) -> dict:
    """Seed 0's validation gold: its best rise over the base model within `within` images, in standard
    errors of the difference (each evaluation's SE over its samples); go when ≥ 2."""
    inside = (images > 0) & (images <= within)
    if not inside.any():
        return {"go": False, "rise": math.nan, "z": math.nan, "within": within}
    rises = values[inside] - values[0]
    z = rises / np.sqrt(errors[inside] ** 2 + errors[0] ** 2 + 1e-30)
    best = int(np.argmax(z))
    return {"go": bool(z[best] >= 2), "rise": float(rises[best]), "z": float(z[best]), "within": within}
