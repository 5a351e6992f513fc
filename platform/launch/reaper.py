"""A local Ray that dies with its driver, even one killed with SIGKILL: a small reaper process holds the
read end of a pipe whose write end only the driver holds. The driver writes the PIDs of its descendants
(the local Ray's GCS, raylet, dashboard and its agents, workers) into it every few seconds; EOF means
the driver is gone, and the reaper kills those that are still alive (matched by PID and start time, so
a reused PID is never hit).

    start_reaper()          # after ray.init(address="local"); the driver keeps the pipe open until it exits
    tell_reaper()           # optional: tell it the descendants now (a thread does so every EVERY_S seconds)

Ray starts its daemons with kill-on-parent-death, but the dashboard's and the runtime-env agents are
the raylet's children and outlive a SIGKILLed driver by many seconds (issue 20: both still running
after 10 s) without this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

EVERY_S = 3.0

REAPER = r"""
import json, os, signal, sys
seen = {}
for line in sys.stdin:          # EOF: the driver is gone (exit, crash or SIGKILL)
    try:
        seen.update({int(pid): started for pid, started in json.loads(line)})
    except ValueError:
        pass
import psutil
for pid, started in seen.items():
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) < 1e-3:
            process.kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
"""


def _descendants() -> list[tuple[int, float]]:
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            found.append((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            pass
    return found


_pipe = None  # the write end, held by this driver only: one reaper per driver process
_reaper_pid = None
_writing = threading.Lock()  # the thread and an explicit tell_reaper() never interleave a line


def tell_reaper() -> None:
    """Tell the reaper this driver's descendants now; a no-op without one, or once it is gone."""
    if _pipe is None:
        return
    try:
        with _writing:
            _pipe.write(json.dumps([p for p in _descendants() if p[0] != _reaper_pid]) + "\n")
    except (OSError, ValueError):  # the reaper is gone, or the interpreter is shutting down
        pass


def start_reaper() -> None:
    """Start the reaper and a daemon thread that keeps telling it this driver's descendants."""
    global _pipe, _reaper_pid
    read, write = os.pipe()
    reaper = subprocess.Popen([sys.executable, "-c", REAPER], stdin=read, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(read)
    _pipe = os.fdopen(write, "w", buffering=1)  # not inheritable: Ray's processes never hold it open
    _reaper_pid = reaper.pid

    def keep_telling() -> None:
        while not _pipe.closed:
            tell_reaper()
            threading.Event().wait(EVERY_S)

    threading.Thread(target=keep_telling, name="alignprop-reaper", daemon=True).start()
