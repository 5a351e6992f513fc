"""What the driver refuses before Ray starts, and what it leaves behind when it is killed: a Ray address
that is a web server, more workers than this machine holds (also as a sweep's choice), and no Ray
process surviving a SIGKILLed `alignprop train`."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import subprocess_env
from test_cli_errors import assert_one_error_line, run_cli


class QuietWebServer(http.server.ThreadingHTTPServer):
    """Handler threads joined on close, and a probe that hangs up is no traceback: printed from a handler
    thread, it landed in the next test's captured stderr (CI failed the next test on that traceback)."""

    daemon_threads, block_on_close = False, True

    def handle_error(self, request, client_address):
        pass


@pytest.fixture()
def web_server():
    server = QuietWebServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()  # joins the handler threads


def test_a_ray_address_that_is_a_web_server_is_refused_at_once(tmp_path, web_server):
    started = time.monotonic()
    proc = run_cli(["train", "--config", "tiny-cpu", f"ray.address=127.0.0.1:{web_server}",
                    f"ray.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    message = assert_one_error_line(proc, "ray.address: ")
    assert "answers as a web server" in message and time.monotonic() - started < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written"


def test_more_workers_than_this_machine_holds_are_refused_before_ray(tmp_path):
    proc = run_cli(["train", "--config", "tiny-cpu", "ray.num_workers=4000", "ray.resources_per_worker={CPU: 0.0001}",
                    f"ray.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    assert "MB of memory" in assert_one_error_line(proc, "ray.num_workers: 4000 workers need at least ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_sweep_choice_this_machine_cannot_hold_is_refused_before_ray(tmp_path):
    (tmp_path / "w.yaml").write_text("metric: eval/reward_total\nspace:\n"
                                     "  ray.num_workers: {space: choice, categories: [1, 64]}\n")
    proc = run_cli(["tune", "--config", "tiny-cpu", "--space", str(tmp_path / "w.yaml"),
                    f"ray.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    message = assert_one_error_line(proc, "space (ray.num_workers=64): ray.num_workers")
    assert "64 workers" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.yaml"]


DRIVER = """
import os, threading, ray
from alignprop.platform.launch.ray_cluster import init_ray
from alignprop.platform.launch.reaper import tell_reaper

init_ray(None)                                  # the local Ray of `alignprop train`, with its reaper


@ray.remote(num_cpus=0.5)
class Worker:
    def pid(self):
        return os.getpid()


worker = Worker.remote()
print(ray.get(worker.pid.remote()), flush=True)  # a worker process is up too
tell_reaper()                                   # what the reaper's thread does every few seconds
print("up", flush=True)
threading.Event().wait()                        # until the test kills this driver
"""


@pytest.mark.slow
def test_no_ray_process_outlives_a_driver_killed_with_sigkill():
    """The driver of `alignprop train` and `tune` starts its local Ray through `init_ray`; SIGKILL it and
    every process that Ray started (GCS, raylet, dashboard and its agents, a worker) is gone within 20 s."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=subprocess_env(), start_new_session=True)
    lines = []
    for line in driver.stdout:  # blocks until the driver has told its reaper about a running worker
        lines.append(line)
        if line.strip() == "up":
            break
    assert lines and lines[-1].strip() == "up", "".join(lines)[-2000:]
    worker_pid = int(lines[-2])
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    assert worker_pid in {p.pid for p in ray_processes} and len(ray_processes) >= 4, ray_processes
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    gone, alive = psutil.wait_procs(ray_processes, timeout=20)
    assert not alive, f"still running 20 s after the driver's SIGKILL: {[(p.pid, p.name()) for p in alive]}"
