"""`alignprop ui` (and `make ui`): the MLflow UI over a tracking store, on 127.0.0.1, that stops on SIGTERM.

    alignprop ui                                  # sqlite:///<cwd>/mlflow.db on http://127.0.0.1:5000
    alignprop ui --tracking-uri sqlite:////abs/mlflow.db --port 5001

`mlflow ui` starts uvicorn as a child and does not pass it a SIGTERM (a supervisor's, or the one GNU
make forwards when `make ui` is stopped): uvicorn kept serving after its parent had gone. Here the
server runs in its own process group, and SIGTERM, SIGINT and SIGHUP stop that whole group. One
worker and no job runner (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`): the UI answers within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 10.0  # after SIGTERM, the server group gets this long before SIGKILL


def ui_command(uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", uri]


def serve_ui(uri: str, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI until it exits or this process gets a stop signal; returns its exit status."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(ui_command(uri, host, port), env=env, start_new_session=True)
    print(f"[alignprop] MLflow UI of {uri} at http://{host}:{port} (Ctrl-C or SIGTERM stops it)",
          file=sys.stderr, flush=True)

    stopped = []

    def stop(signum, _frame):
        stopped.append(signum)
        _signal_group(server.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        while True:
            try:
                status = server.wait()
                break
            except KeyboardInterrupt:  # the handler above already stopped the group
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _stop_group(server.pid)
    return 0 if stopped or status == 0 else status


def _stop_group(pgid: int) -> None:
    """What is left of the server's group (uvicorn outlives `mlflow ui`): SIGTERM, then SIGKILL."""
    import time

    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
