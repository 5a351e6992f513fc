"""`alignprop compare`: the paper's claim measured fairly. Every method (arm) trains with its own
sampler, structure, learning-rate grid and budget; learning rates are chosen on the validation split
(seed 0), the other seeds are reported on the test split; the report gives, for targets τ, the cost an
RL baseline needs over a reward-gradient method's with bootstrap CIs, in images, denoiser evaluations
and seconds, on gold and proxy, and "not reached within B" where a curve never crosses τ.

    alignprop compare --config toy-count --protocol paper               # rerun = resume
    alignprop compare --config toy-count --protocol paper --only alignprop,ddpo

| module | holds |
|---|---|
| `protocol.py` | the arms of each protocol (`PAPER`, `TINY`) and `arm_config` |
| `driver.py` | `run_compare`: the two phases of every arm as `alignprop tune` sweeps, then the report |
| `ratios.py` | curves → reach, crossing by 2 SE, ratio with bootstrap CI, targets, rankings, AUC, go/no-go (no I/O) |
| `report.py` | curves from MLflow, the tables, `sample_efficiency.png`/.md/.csv in the comparison's run |
"""

from .driver import run_compare
from .protocol import PAPER, PROTOCOLS, TINY, Arm, Protocol, arm_config

__all__ = ["PAPER", "PROTOCOLS", "TINY", "Arm", "Protocol", "arm_config", "run_compare"]
