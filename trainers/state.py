"""What a recipe persists beside the engine state: one dataclass, one list of counters.

    state = TrainerState()
    (path / STATE_FILE).write_text(state.to_json())
    state = TrainerState.from_json(text)      # a checkpoint of an older alignprop: missing fields default

A new counter is one field here: it is saved, restored and defaulted for older checkpoints with no
other change. Field names are the JSON keys of `trainer_state.json` (checkpoints of every earlier
version load).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

STATE_FILE = "trainer_state.json"


def _fresh_early_stop() -> dict:
    return {"best": -math.inf, "evals_without_best": 0}


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    best_eval: float = -math.inf  # the best held-out `trainer.best_metric` so far: `lora/best`
    early_stop: dict = field(default_factory=_fresh_early_stop)  # best, evals_without_best, stopped
    last_eval: dict = field(default_factory=dict)  # carried in every report: schedulers compare it each step
    reward_stats: dict = field(default_factory=dict)  # the normalised rewards' running statistics
    # the common x-axis of every algorithm: sampled images, denoiser evaluations, seconds in training steps
    images_seen: int = 0
    unet_evals: int = 0
    wall_s: float = 0.0
    ddpo_stats: Optional[dict] = None  # DDPO's per-prompt reward buffers (trainers/ddpo.py)
    config_name: str = ""  # written for a reader of the file; not read back

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        """Known keys only (with their types); fields a checkpoint predates keep their defaults."""
        data, state = json.loads(text), cls()
        for f in fields(cls):
            if f.name in data and data[f.name] is not None:
                value = data[f.name]
                setattr(state, f.name, {"int": int, "float": float}.get(f.type, lambda v: v)(value))
        return state
