"""MLflow tracking: the driver opens (or re-opens) the run; rank 0 of the workers logs into it.

| module | holds |
|---|---|
| `runs.py` | the tracking URI (absolute, probed), `open_run`/`tracked_run` (names, heartbeat), the run lock |
| `datasets.py` | the prompt sets as dataset inputs |
| `tracker.py` | `Tracker`: rank 0's metrics, evaluation grids and LoRA artifacts |

The driver resolves an absolute tracking URI (Ray workers and jobs run in other directories),
creates the experiment and the run, logs the flattened config and the prompt sets, and hands
`(uri, run_id)` to the workers.
"""

from .datasets import PromptSet, log_prompt_sets, prompt_sets
from .runs import (COMMAND_TAG, HEARTBEAT_EVERY_S, HEARTBEAT_LEASE_S, HEARTBEAT_TAG, LOCK_FILE, OWNER_TAG, RUN_NAME_TAG,
                   git_commit, open_run, probe_tracking_uri, quote_filter_value, resolve_tracking_uri, run_context_tags,
                   run_lock, tracked_run)
from .tracker import TILE_PX, Tracker, image_grid, last_logged_step

__all__ = ["COMMAND_TAG", "HEARTBEAT_EVERY_S", "HEARTBEAT_LEASE_S", "HEARTBEAT_TAG", "LOCK_FILE", "OWNER_TAG",
           "RUN_NAME_TAG", "TILE_PX", "PromptSet", "Tracker", "git_commit", "image_grid", "last_logged_step",
           "log_prompt_sets", "open_run", "probe_tracking_uri", "prompt_sets", "quote_filter_value",
           "resolve_tracking_uri", "run_context_tags", "run_lock", "tracked_run"]
