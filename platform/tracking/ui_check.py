"""Screenshots of the MLflow UI over a tracking database, in headless Chromium: a check by eye of
what a run shows (image grids, artifact names, tags, datasets, the experiment's view). Not a test
(no `test_` prefix): run it by hand after changing what runs log, and look at the PNGs.

    # against a real training run (≈ 1–2 min on 2 cores)
    RAY_AUTH_MODE=token OMP_NUM_THREADS=1 .venv/bin/alignprop train --config tiny-cpu trainer.max_steps=4
    trainer.eval_every=2 \\
        tracking.uri=sqlite:////tmp/uirun/mlflow.db ray.storage_path=/tmp/uirun/ray_results
    .venv/bin/python -m alignprop.platform.tracking.ui_check --db /tmp/uirun/mlflow.db --out /tmp/ui_check

    # without training: logs a small run through the real tracking code (open_run + Tracker) first
    .venv/bin/python -m alignprop.platform.tracking.ui_check --out /tmp/ui_check

Needs Debian's `chromium` (`apt-get install -y chromium`); drives it over the DevTools protocol
with aiohttp (a Ray dependency), no other package. Starts `mlflow server` on a free 127.0.0.1 port
over the database, waits for its /health, and screenshots the newest run's experiment page as a
fresh browser opens it (`experiment.png`) and with `?workflowType=machine_learning`
(`experiment_training_view.png`), the run's overview (`run_overview.png`: source, commit, user,
datasets), its artifacts with the first evaluation grid open (`run_artifacts.png`), its
model-metrics charts (`run_model_metrics.png`) and the experiment's chart view
(`experiment_charts.png`); prints the run's `mlflow.*` tags and dataset inputs, stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .datasets import PromptSet
from .runs import open_run
from .tracker import Tracker

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_run(db: Path) -> None:
    """A run logged through the real code path: open_run (tags, datasets, experiment kind) and
    the rank-0 Tracker (metrics, captioned evaluation grids), with 32×32 images like the tiny pipeline's."""
    import torch
    from mlflow import MlflowClient


    uri = f"sqlite:///{db}"
    # the experiment first, with its artifacts beside the database (else ./mlruns of the cwd)
    MlflowClient(uri).create_experiment("ui-check", artifact_location=(db.parent / "ui_check_artifacts").as_uri())
    prompts = ["a photo of a cat", "a photo of a horse", "a photo of a whale",
               "a watercolour painting of a very small bee sitting on a large yellow sunflower at dawn"]
    sets = [PromptSet("training", "simple_animals.txt", "/prompts/simple_animals.txt", ("cat", "dog", "horse")),
            PromptSet("evaluation", "trainer.eval_prompts", "config", tuple(prompts))]
    run_id = open_run(uri, "ui-check", "ui-check-run", {"optim.lr": 0.03, "lora.rank": 8}, "name: ui-check\n",
                      datasets=sets)
    tracker = Tracker(uri, run_id, enabled=True)
    generator = torch.Generator().manual_seed(0)
    for step in (0, 2, 10):  # 10: the artifact tree lists step_0010 after step_0002
        tracker.log_metrics({"step": step, "eval/reward_total": 0.5 + 0.01 * step}, step)
        tracker.log_image(torch.rand(4, 3, 32, 32, generator=generator), "eval/samples", step, captions=prompts)
    MlflowClient(uri).set_terminated(run_id, "FINISHED")


def latest_run(db: Path) -> tuple[str, str, str]:
    """(experiment id, run id, run name) of the newest run outside the Default experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"ui_check: no run in {db}")
    return runs[0].info.experiment_id, runs[0].info.run_id, runs[0].info.run_name


def first_grid(db: Path, run_id: str) -> str:
    """The run's first evaluation grid artifact (for the artifact page), or '' if it has none."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    found = [f.path for f in client.list_artifacts(run_id, "eval/samples") if f.path.endswith(".png")]
    return sorted(found, key=lambda p: int(p.rsplit("_", 1)[-1].split(".")[0]) if "_" in p else -1)[0] if found else ""


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    artifacts = log.parent / "server_artifacts"  # for runs made through the server; ours carry file:// URIs
    return subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_healthy(base: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"ui_check: mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)  # poll interval; the loop ends on the server's answer
    sys.exit(f"ui_check: {base} did not answer /health in {timeout_s:.0f} s")


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, already a
    Ray dependency): real time, so lazily loaded charts and images render, and we wait for the page
    instead of guessing a delay. One fresh profile per run: what a first visit shows."""

    def __init__(self, chromium: str):
        self.profile = tempfile.mkdtemp(prefix="ui_check_profile_")
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ids = 0

    async def __aenter__(self) -> "Browser":
        import aiohttp

        active = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port here once listening
        deadline = time.monotonic() + 60
        while not (active.is_file() and len(active.read_text().split()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit("ui_check: chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = int(active.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            page = next(t for t in await reply.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params):
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:  # events arrive in between; we only want our answer
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str):
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def screenshot(self, url: str, out: Path, expect: str, size: tuple[int, int], timeout_s: float = 90) -> None:
        """Load `url`, wait until `expect` is on the page, nothing is loading and the page has not
        changed for 2 s, then save a PNG of the viewport."""
        await self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                        mobile=False)
        await self.call("Page.navigate", url=url)
        state = """JSON.stringify([document.readyState, document.body ? document.body.innerText.length : 0,
            document.querySelectorAll('img, svg, canvas').length,
            [...document.images].filter(i => !i.complete).length,
            document.querySelectorAll('[role=progressbar], [aria-busy=true], [class*=spinner i], '
                                      + '[class*=skeleton i]').length,
            document.body ? document.body.innerText.includes(%s) : false])""" % json.dumps(expect)
        deadline, last, stable_since = time.monotonic() + timeout_s, None, time.monotonic()
        while time.monotonic() < deadline:
            now = await self.js(state)
            ready, _, _, pending_images, loading, found = json.loads(now)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif ready == "complete" and found and not pending_images and not loading:
                if time.monotonic() - stable_since >= 2:
                    break
            await asyncio.sleep(0.25)  # poll interval; the loop ends on the page's state
        else:
            print(f"ui_check: {url} still loading after {timeout_s:.0f} s ({last}); screenshot as it is")
        shot = await self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        print(f"{out}  <- {url}")


async def screenshots(chromium: str, base: str, experiment_id: str, run_id: str, run_name: str, grid: str,
                      out: Path) -> None:
    training = "workflowType=machine_learning"  # the UI's sidebar switch, set in the URL
    run_page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    wide, tall = (1600, 1100), (1600, 2000)
    async with Browser(chromium) as browser:  # the first page: a fresh profile, the UI's own default view
        await browser.screenshot(f"{base}/#/experiments/{experiment_id}", out / "experiment.png", "Experiments", wide)
    async with Browser(chromium) as browser:
        await browser.screenshot(f"{base}/#/experiments/{experiment_id}?{training}",
                                 out / "experiment_training_view.png", run_name, wide)
        await browser.screenshot(f"{run_page}?{training}", out / "run_overview.png", "Datasets", tall)
        artifact = f"{run_page}/artifacts/{grid}" if grid else f"{run_page}/artifacts"
        await browser.screenshot(f"{artifact}?{training}", out / "run_artifacts.png", "config.yaml", wide)
        await browser.screenshot(f"{run_page}/model-metrics?{training}", out / "run_model_metrics.png", "Step", tall)
        await browser.screenshot(f"{base}/#/experiments/{experiment_id}/runs?{training}&compareRunsMode=CHART",
                                 out / "experiment_charts.png", run_name, tall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="sqlite tracking database (default: log a small run into a new one)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ui_check"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("ui_check: no chromium on PATH; install it with: apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.db
    if db is None:
        db = args.out / "ui_check.db"
        db.unlink(missing_ok=True)
        shutil.rmtree(args.out / "ui_check_artifacts", ignore_errors=True)
        make_run(db)
    db = db.resolve()
    experiment_id, run_id, run_name = latest_run(db)
    grid = first_grid(db, run_id)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(db, port, args.out / "mlflow_server.log")
    try:
        wait_healthy(base, server)
        asyncio.run(screenshots(chromium, base, experiment_id, run_id, run_name, grid, args.out))
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as reply:
            run = json.load(reply)["run"]
        print(json.dumps({"tags": {t["key"]: t["value"] for t in run["data"].get("tags", [])
                                   if t["key"].startswith("mlflow.") and t["key"] != "mlflow.log-model.history"},
                          "datasets": [(d["dataset"]["name"], [t["value"] for t in d.get("tags", [])])
                                       for d in run.get("inputs", {}).get("dataset_inputs", [])]}, indent=1))
    finally:
        os.killpg(server.pid, 15)  # the server and its worker: their own session, started above
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
