"""The arms of a fair comparison: each method at its own sampler, structure, learning-rate grid and budget
(`PAPER`: the paper's claim against DDPO and GRPO; `LAYOUT`, `LAYOUT3`: DRTune and Direct-Align against
AlignProp and ReFL at count 1 and 3; `TINY` is what the suite runs); `arm_config` makes an arm's run config.
driver.py runs them:

Phase 1 sweeps each arm's `lrs` on seed 0 (`<name>-<arm>-lr`) and picks the rate with the largest area
under its validation gold curve (`val/<gold>` against images, trapezoids over the budget); while that rate
is at an end of the rates tried, the next rate past it runs too (`<name>-<arm>-lr-ext<i>`, at most `extend`).
Phase 2 runs `seeds` at the chosen rate (`<name>-<arm>-seeds-lr<rate>`); only phase 2 is reported (seed 0
chose the rate). Every
sweep is an ordinary `alignprop tune` sweep: rerunning the command resumes each from its own records,
and a finished one is read back, not rerun. All runs are judged by one evaluation sampler
(`trainer.eval_eta`, `trainer.eval_num_steps`, in `common`), whatever sampler they train with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError, RunConfig, load_config


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]  # onto the preset and the protocol's common overrides
    lrs: tuple[float, ...]
    budget: int  # images sampled (all ranks)
    rl: bool = False  # an RL baseline: its final reward is a target of the ratio table, with a go/no-go
    reference: bool = False  # a baseline that is not RL: its final reward is a target of the ratio table too
    go_no_go: int = 0  # images of a first one-seed run at the grid's middle rate that must move the gold (0: none)

    @property
    def sets_targets(self) -> bool:
        return self.rl or self.reference


@dataclass(frozen=True)
class Protocol:
    name: str
    arms: tuple[Arm, ...]
    common: tuple[str, ...]
    gold: str  # the eval reward that is the truth (the validation split chooses on val/<gold>)
    proxy: str  # the reward being trained
    seeds: tuple[int, ...] = (1, 2)
    evaluations: int = 10  # per run, evenly over its budget
    extend: int = 2  # at most this many rates tried past a grid's end while the best sits there (driver.beyond)
    notes: dict[str, str] = field(default_factory=dict)


PAPER = Protocol(
    name="paper",
    common=("ray.num_workers=1", "trainer.batch_size=8", "trainer.val_prompt_file=toy_val.txt",
            "trainer.eval_eta=0.0", "trainer.eval_num_steps=10", "trainer.best_metric=val/toy_count_judge",
            "trainer.eval_seeds=2"),
    gold="toy_count_judge", proxy="toy_count",
    arms=(
        Arm("alignprop", ("trainer.algorithm=alignprop", "sampling.eta=0.0", "truncation.strategy=uniform",
                          "truncation.low=1", "truncation.high=10"), (1e-3, 3e-3, 1e-2), 480),
        Arm("refl", ("trainer.algorithm=refl", "sampling.eta=1.0"), (1e-3, 3e-3, 1e-2), 480),
        Arm("draft_lv", ("trainer.algorithm=draft_lv", "sampling.eta=0.0", "draft_lv.copies=2"), (1e-3, 3e-3, 1e-2),
            480),
        Arm("ddpo", ("trainer.algorithm=ddpo", "sampling.eta=1.0", "optim.grad_accum=8", "ddpo.updates_per_epoch=2",
                     "trainer.images_per_prompt=4", "ddpo.stats_buffer=16", "ddpo.stats_min_count=4"),
            (3e-4, 1e-3, 3e-3), 6400, rl=True, go_no_go=2048),
        Arm("grpo", ("trainer.algorithm=grpo", "sampling.eta=1.0", "optim.grad_accum=8", "grpo.group_size=8",
                     "grpo.kl_coef=0.04", "grpo.updates_per_epoch=2"), (3e-4, 1e-3, 3e-3), 6400, rl=True),
    ),
    notes={"alignprop": "η = 0, K ~ U{1..N}", "refl": "η = 1, stop step in [⌊3N/4⌋, N−1]",
           "draft_lv": "η = 0, n = 2", "ddpo": "η = 1, 64 images/epoch, 2 updates/epoch, 4 images/prompt",
           "grpo": "η = 1, group 8, KL 0.04, 2 updates/epoch"},
)


def _layout(name: str, count: int) -> Protocol:
    """Reward gradients into early steps (DRTune, Direct-Align) beside AlignProp's last K and ReFL's one late
    step, on the count task at target `count`: layout is decided in the early, high-noise steps."""
    target = (f"rewards.toy_count.target={count}", f"eval_rewards.toy_count_exact.target={count}",
              f"eval_rewards.toy_count_judge.target={count}")
    grid = (1e-3, 3e-3, 1e-2)
    return Protocol(
        name=name, common=PAPER.common + target, gold="toy_count_judge", proxy="toy_count", seeds=(1, 2, 3),
        arms=(
            Arm("alignprop", PAPER.arms[0].overrides, grid, 480, reference=True),
            Arm("drtune", ("trainer.algorithm=drtune", "sampling.eta=0.0", "drtune.train_steps=3"), grid, 480),
            Arm("direct_align", ("trainer.algorithm=direct_align", "sampling.eta=0.0", "direct_align.t_low=0.1",
                                 "direct_align.t_high=0.5"), grid, 480),
            Arm("refl", PAPER.arms[1].overrides, grid, 480),
        ),
        notes={"alignprop": "η = 0, K ~ U{1..N}", "drtune": "η = 0, K = 3 spread, inputs detached",
               "direct_align": "η = 0, one step in [0.1N, 0.5N)", "refl": "η = 1, stop step in [⌊3N/4⌋, N−1]"},
    )


LAYOUT, LAYOUT3 = _layout("layout", 1), _layout("layout3", 3)

# What the suite runs: two arms, two seeds, a few updates (tests/test_compare.py)
TINY = Protocol(
    name="tiny",
    common=("ray.num_workers=1", "trainer.batch_size=4", "sampling.num_steps=4", "truncation.k=4",
            "trainer.eval_seeds=1",
            "trainer.val_prompt_file=toy_val.txt",
            "trainer.eval_eta=0.0", "trainer.eval_num_steps=4", "trainer.best_metric=val/toy_count_judge"),
    gold="toy_count_judge", proxy="toy_count", evaluations=2, extend=0,
    arms=(
        Arm("alignprop", ("trainer.algorithm=alignprop", "sampling.eta=0.0", "truncation.strategy=uniform",
                          "truncation.low=1", "truncation.high=4"), (1e-3, 1e-2), 8),
        Arm("grpo", ("trainer.algorithm=grpo", "sampling.eta=1.0", "grpo.group_size=4", "grpo.kl_coef=0.04"),
            (1e-2,), 8, rl=True),
    ),
)

PROTOCOLS = {p.name: p for p in (PAPER, LAYOUT, LAYOUT3, TINY)}


def arm_config(preset: str, overrides: list[str], protocol: Protocol, arm: Arm, name: str,
               lr: Optional[float] = None) -> RunConfig:
    """The arm's run config: preset ← protocol's common ← arm ← the user's overrides; the budget in steps,
    `evaluations` evaluations over it, one experiment for the whole comparison."""
    base = [*protocol.common, *arm.overrides, *overrides, f"tracking.experiment={name}",
            *([f"optim.lr={lr}"] if lr is not None else [])]
    cfg = load_config(preset, base)
    per_step = cfg.trainer.batch_size * cfg.optim.grad_accum * cfg.ray.num_workers
    if arm.budget % per_step:
        raise ConfigError(f"compare: arm {arm.name}: budget {arm.budget} images is not a multiple of the {per_step} "
                          "images per step; accepted: trainer.batch_size × optim.grad_accum × ray.num_workers "
                          "dividing it")
    steps = arm.budget // per_step
    every = max(1, steps // protocol.evaluations)
    return load_config(preset, base + [f"trainer.max_steps={steps}", f"trainer.eval_every={every}",
                                       f"trainer.ckpt_every={every}"])


def choose(only: Optional[str], protocol: Protocol) -> list[Arm]:
    known = {a.name: a for a in protocol.arms}
    wanted = [w.strip() for w in only.split(",")] if only else list(known)
    bad = [w for w in wanted if w not in known]
    if bad:
        raise ConfigError(f"--only: {', '.join(bad)} not an arm of protocol {protocol.name}; "
                          f"accepted: {', '.join(known)}")
    return [known[w] for w in wanted]
