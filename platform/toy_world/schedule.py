"""How a toy-world build phase spends its time: learning-rate schedule, thread count, when to stop.

A phase trains until its share of the budget is spent. Its learning rate warms up over WARMUP
steps, holds, and decays linearly to 0 over the last `decay_share` of its time; the decay's length
in steps is planned when it starts, from the pace of the last steps. On a shared 2-core machine
two threads are ~1.6× faster than one when the machine is idle and up to ~15× slower when another
process competes for a core (every parallel region waits for the descheduled thread): `Threads`
measures the pace of each setting as it trains and keeps the faster one, trying the other again
every RETRY_S seconds.

What a phase did — decay start and end, last step, thread count from each step on — is its plan
(`{"decay_start", "horizon", "stop", "threads": [[step, n], ...]}`); results also depend on the
thread count, so a plan replays a phase step for step (`alignprop toy-world build DIR --replay
build.json`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

WARMUP = 50  # steps of linear learning-rate warm-up in each phase
TRIAL_STEPS = 20  # steps timed per thread setting before comparing
RETRY_S = 120.0  # seconds between trials of the other thread setting
SWITCH_MARGIN = 1.15  # two threads must be this much faster to be kept (one is the safe choice)


def lr_factor(step: int, decay_start: Optional[int], horizon: Optional[int]) -> float:
    """Linear warm-up over WARMUP steps, constant, then linear decay from `decay_start` to 0 at `horizon`."""
    factor = min(1.0, (step + 1) / WARMUP)
    if decay_start is None or step < decay_start:
        return factor
    return factor * max(0.0, (horizon - step) / max(1, horizon - decay_start))


class Threads:
    """Picks the thread count, 1 or `most`, by measured pace; `schedule` records [step, n] changes.

    Starts on one thread (never pathological); after each window of TRIAL_STEPS steps on `most`
    threads it stays there only while they are SWITCH_MARGIN× faster than one thread last was, and
    a trial that runs at half one thread's pace is cut short. One thread gets a new trial of `most`
    every RETRY_S seconds."""

    def __init__(self, schedule: list[list[int]], most: int, replay: bool):
        self.schedule, self.most, self.replay = schedule, most, replay
        self.pace: dict[int, float] = {}  # median seconds/step of each setting's last window
        self.window: list[float] = []
        self.last_trial, self.started = 0.0, False

    def before(self, step: int, clock: float) -> None:
        """Set the thread count for `step`."""
        if self.replay:
            n = ([n for s, n in self.schedule if s <= step] or [1])[-1]
        else:
            if not self.started:  # a fresh phase, or a resumed one: start safe
                self.started, self.last_trial = True, clock
                if not self.schedule or self.schedule[-1][1] != 1:
                    self.schedule.append([step, 1])
            n = self.schedule[-1][1]
            if n == 1 and self.most > 1 and not self.window and clock - self.last_trial >= RETRY_S:
                n = self.most
                self.schedule.append([step, n])
                self.last_trial = clock
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def after(self, step: int, seconds: float, clock: float) -> None:
        """Time `step`; at the end of a window (or a hopeless trial), keep the faster setting."""
        if self.replay or self.most == 1:
            return
        self.window.append(seconds)
        n = self.schedule[-1][1]
        median = sorted(self.window)[len(self.window) // 2]  # one preempted step is noise
        hopeless = n > 1 and len(self.window) >= 3 and median > 2 * self.pace.get(1, float("inf"))
        if len(self.window) < TRIAL_STEPS and not hopeless:
            return
        self.pace[n], self.window = median, []
        if n == 1 and self.most not in self.pace:
            self.last_trial = float("-inf")  # the first trial of `most` threads comes right away
        elif n > 1 and median * SWITCH_MARGIN > self.pace[1]:
            self.schedule.append([step + 1, 1])
            self.last_trial = clock  # the next trial of `most` threads waits RETRY_S from here


def run_phase(record: dict, phase: str, step_fn: Callable[[int], float], opt, base_lr: float,
              clock: Callable[[], float],
              stop_at_s: float, decay_share: float, plan: Optional[dict],
              on_step: Callable[[int, float], None]) -> None:
    """The steps of one phase. `record[phase + "_plan"]` is filled with what it did; `plan` (one
    such dict from an earlier build) replays it instead of following the clock."""
    done = record.setdefault(f"{phase}_plan", {"decay_start": None, "horizon": None, "stop": None, "threads": []})
    if plan:
        done.update(decay_start=plan["decay_start"], horizon=plan["horizon"],
                    threads=[list(x) for x in plan["threads"]])
    phase_start = record.setdefault(f"{phase}_t0", clock())
    most = 1 if plan else max(1, min(2, os.cpu_count() or 1, int(os.environ.get("ALIGNPROP_MAX_THREADS", 2))))
    threads = Threads(done["threads"], most, replay=bool(plan))
    steps_key, time_key = f"{phase}_step", f"{phase}_s"
    recent: list[float] = []

    def finished(step: int) -> bool:
        if plan:
            return step >= plan["stop"]
        return step >= 1 and (clock() >= stop_at_s or (done["horizon"] is not None and step >= done["horizon"]))

    def maybe_plan_decay(step: int) -> None:  # when decay_share of the phase's time is left
        if plan or done["horizon"] is not None or decay_share <= 0:
            return
        if clock() >= stop_at_s - decay_share * (stop_at_s - phase_start):
            pace = sum(recent[-50:]) / len(recent[-50:]) if len(recent) >= 10 else record[time_key] / max(step, 1)
            done["decay_start"] = step
            done["horizon"] = step + max(1, int(0.97 * (stop_at_s - clock()) / pace))

    threads_before = torch.get_num_threads()
    try:
        while not finished(record[steps_key]):
            step = record[steps_key]
            maybe_plan_decay(step)
            threads.before(step, clock())
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(step, done["decay_start"], done["horizon"])
            start = clock()
            loss = step_fn(step)
            recent.append(clock() - start)
            record[steps_key] = step + 1
            record[time_key] += recent[-1]
            threads.after(step, recent[-1], clock())
            on_step(step + 1, loss)
    finally:
        torch.set_num_threads(threads_before)
    done["stop"] = record[steps_key]
