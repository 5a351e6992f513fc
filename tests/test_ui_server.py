"""`make ui` as the README shows it: the MLflow UI answers over the store, and a SIGTERM to make (what
a supervisor or `kill` sends; GNU make passes it to its recipe) stops the server too: nothing keeps
listening on the port, no process of it is left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

from conftest import REPO, free_port, subprocess_env


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_naming(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(pid))
    return found


def test_make_ui_answers_and_a_sigterm_to_make_stops_the_server(tmp_path):
    port, log = free_port(), tmp_path / "make-ui.log"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    with open(log, "w") as out:  # a file, not a pipe: a server that outlives make would hold a pipe open
        make = subprocess.Popen(["make", "-s", "-C", str(REPO), "ui", f"UI_PORT={port}", f"UI_STORE={store}"],
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    started, url = time.monotonic(), f"http://127.0.0.1:{port}/"
    try:
        while not _answers(url):
            assert make.poll() is None, log.read_text()
            assert time.monotonic() - started < 120, "the UI did not answer within 120 s"
            time.sleep(0.2)
        print(f"\n[ui] make ui answered after {time.monotonic() - started:.1f} s")
        assert _processes_naming(f"--port {port}"), "the server runs under this port"
        make.send_signal(signal.SIGTERM)
        make.wait(timeout=60)
        assert not _listening(port), "the server still listens after make was stopped"
        assert _processes_naming(f"--port {port}") == [], "a server process outlived make"
        assert f"MLflow UI of {store} at http://127.0.0.1:{port}" in log.read_text()
    finally:
        if make.poll() is None:
            make.kill()
        for pid in _processes_naming(f"--port {port}"):  # what a failed run left behind
            os.kill(pid, signal.SIGKILL)
