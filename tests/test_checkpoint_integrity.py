"""Checkpoints are whole or known broken: a manifest of sizes and sha256s written last, verified on
resume, the newest whole checkpoint used when the latest is truncated; a storage path that cannot hold
a checkpoint is one line, before Ray starts or when the disk fills during a run, and the last complete
checkpoint stays."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignprop.platform.config import load_config
from alignprop.platform.errors import StorageFullError
from alignprop.platform.launch.storage import check_free_space, checkpoint_bytes_estimate, report_checkpoint
from alignprop.trainers.alignprop import AlignPropRecipe, WorkerContext
from alignprop.trainers.checkpoint_integrity import newest_valid, verify_checkpoint
from conftest import subprocess_env

TINY = ["trainer.eval_every=0", "sampling.num_steps=4", "truncation.k=2", "trainer.ema_decay=0.9"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, deepspeed_world):
    """A run's storage folder with the checkpoints of steps 1 and 2, named as Ray names them."""
    root = tmp_path_factory.mktemp("run")
    saved = {}

    def keep(metrics, directory):
        if directory:
            saved[metrics["step"]] = shutil.copytree(directory,
                                                     root / f"checkpoint_2026-12-02_10-00-0{metrics['step']}")

    cfg = load_config("tiny-cpu", [*TINY, "trainer.max_steps=2", "trainer.ckpt_every=1"])
    AlignPropRecipe(cfg, WorkerContext(progress=False, report=keep)).setup().train()
    return saved[1], saved[2]


def test_a_whole_checkpoint_verifies_and_its_manifest_lists_every_file(two_checkpoints):
    for directory in two_checkpoints:
        assert verify_checkpoint(directory) is None
        listed = json.loads((directory / "manifest_rank0.json").read_text())["files"]
        assert set(listed) == {p.name for p in directory.iterdir()} - {"manifest_rank0.json"}


def test_a_checkpoint_truncated_at_any_file_is_found_and_the_previous_one_resumes(two_checkpoints, tmp_path,
                                                                                  deepspeed_world):
    first, second = two_checkpoints
    names = sorted(p.name for p in second.iterdir())
    assert len(names) >= 7
    for name in names:
        run = tmp_path / name
        older, newer = (shutil.copytree(d, run / d.name) for d in (first, second))
        data = (newer / name).read_bytes()
        (newer / name).write_bytes(data[: len(data) // 2])  # what a disk that filled mid-copy leaves
        problem = verify_checkpoint(newer)
        assert problem is not None and name in problem, (name, problem)
        chosen, broken = newest_valid(newer)
        assert chosen == older and [b for b, _ in broken] == [newer], name
    cfg = load_config("tiny-cpu", [*TINY, "trainer.max_steps=2"])
    resumed = AlignPropRecipe(cfg, WorkerContext(progress=False, resume_dir=str(chosen))).setup()
    assert resumed.step == 1, "resumed from the checkpoint before the broken one"


def test_a_whole_checkpoint_newer_than_rays_latest_is_the_one_resumed(two_checkpoints, tmp_path):
    """Ctrl-C between writing a checkpoint and Ray recording it: Ray offers the older one, the newer is whole."""
    older, newer = (shutil.copytree(d, tmp_path / "run" / d.name) for d in two_checkpoints)
    assert newest_valid(older) == (newer, [])
    (newer / "trainer_state.json").write_text("{not json")
    chosen, broken = newest_valid(older)
    assert chosen == older and [b for b, _ in broken] == [newer]


def test_a_checkpoint_written_before_manifests_still_verifies_by_its_headers(two_checkpoints, tmp_path):
    old = shutil.copytree(two_checkpoints[1], tmp_path / "checkpoint_old")
    (old / "manifest_rank0.json").unlink()
    assert verify_checkpoint(old) is None
    data = (old / "optimizer.safetensors").read_bytes()
    (old / "optimizer.safetensors").write_bytes(data[:-100])
    assert verify_checkpoint(old) == f"optimizer.safetensors: {len(data) - 100} of {len(data)} bytes"


def test_no_whole_checkpoint_left_means_start_afresh(two_checkpoints, tmp_path):
    directory = shutil.copytree(two_checkpoints[0], tmp_path / "checkpoint_2026-12-02_10-00-01")
    (directory / "trainer_state.json").write_text("{not json")
    chosen, broken = newest_valid(directory)
    assert chosen is None and len(broken) == 1 and broken[0][0] == directory and "trainer_state.json" in broken[0][1]


def test_train_dry_run_says_which_checkpoint_it_would_resume_from(two_checkpoints, tmp_path, monkeypatch):
    """`alignprop train --dry-run` over a run's storage: the newest whole checkpoint and its step, a
    truncated one named and skipped; nothing started, nothing written."""
    import ray

    from alignprop.platform.config import run_name
    from test_cli_errors import run_cli

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    overrides = [*TINY, "trainer.max_steps=3", f"ray.storage_path={tmp_path}/ray",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    run_dir = tmp_path / "ray" / run_name(load_config("tiny-cpu", overrides))
    first, second = (shutil.copytree(d, run_dir / d.name) for d in two_checkpoints)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = run_cli(["train", "--config", "tiny-cpu", "--dry-run", *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"resume: it would resume from {second} (step 2)" in proc.stdout, proc.stdout
    data = (second / "optimizer.safetensors").read_bytes()
    (second / "optimizer.safetensors").write_bytes(data[:100])
    proc = run_cli(["train", "--config", "tiny-cpu", "--dry-run", *overrides], tmp_path)
    assert f"resume: it would resume from {first} (step 1); {second.name} is incomplete (optimizer.safetensors: " \
           f"100 of {len(data)} bytes): skipped" in proc.stdout, proc.stdout
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "a dry run writes nothing"


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB tmpfs (a real full disk); skipped where this user cannot mount one."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "2m"):
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_storage_path_without_room_is_refused_before_anything_starts(small_disk):
    cfg = load_config("tiny-cpu", [f"ray.storage_path={small_disk}", "trainer.keep_checkpoints=2"])
    (small_disk / "filler").write_bytes(b"\0" * (1900 * 1024))
    with pytest.raises(Exception, match=r"^ray.storage_path: .* MB free; 3 checkpoints of this run need about"):
        check_free_space(cfg, str(small_disk))
    assert checkpoint_bytes_estimate(cfg) > 30720 * 16, "the estimate covers weights and both AdamW moments"


def test_a_checkpoint_the_disk_cannot_hold_fails_in_one_line_and_the_last_one_stays(small_disk, tmp_path):
    previous = small_disk / "run" / "checkpoint_1"
    previous.mkdir(parents=True)
    (previous / "optimizer.safetensors").write_bytes(b"\1" * 4096)
    new = tmp_path / "new"
    new.mkdir()
    (new / "optimizer.safetensors").write_bytes(b"\2" * (3 * 2**20))  # more than the disk holds
    calls = []
    with pytest.raises(StorageFullError, match=r"^ray.storage_path: .* MB free; the checkpoint of step 7 needs"):
        report_checkpoint(lambda m, d: calls.append(d), {"step": 7}, str(new), str(small_disk / "run"))
    assert calls == [], "nothing copied"

    def copy_until_full(metrics, directory):  # the disk fills during the copy: another writer takes the room
        (small_disk / "other_writer").write_bytes(b"\0" * (500 * 1024))
        shutil.copytree(directory, small_disk / "run" / "checkpoint_2")

    (new / "optimizer.safetensors").write_bytes(b"\2" * (600 * 1024))
    (small_disk / "filler").write_bytes(b"\0" * (1200 * 1024))
    with pytest.raises(StorageFullError, match="ran out of space writing the checkpoint of step 7"):
        report_checkpoint(copy_until_full, {"step": 7}, str(new), str(small_disk / "run"))
    assert (previous / "optimizer.safetensors").read_bytes() == b"\1" * 4096, "the last checkpoint is untouched"


def test_enospc_from_elsewhere_is_not_mistaken_for_a_full_disk(tmp_path):
    new = tmp_path / "new"
    new.mkdir()

    def broken(metrics, directory):
        raise OSError(errno.EACCES, "permission denied")

    with pytest.raises(PermissionError):
        report_checkpoint(broken, {"step": 1}, str(new), str(tmp_path))


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_fails_it_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "20m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        cmd = [sys.executable, "-m", "alignprop.platform.cli", "train", "--config", "tiny-cpu", "ray.num_workers=1",
               "ray.resources_per_worker={CPU: 0.98}", "trainer.eval_every=0", "trainer.ckpt_every=1",
               "trainer.keep_checkpoints=1", "trainer.max_steps=200", "sampling.num_steps=2", "truncation.k=1",
               f"ray.storage_path={disk}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.run_name=fill"]
        with open(tmp_path / "out.txt", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
            deadline = time.monotonic() + 300
            while not list((disk / "fill").glob("checkpoint_*/manifest_rank0.json")):  # the first checkpoint is in
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-2000:]
                time.sleep(0.2)  # polling for the file; the test proceeds on its appearance
            with open(disk / "filler", "wb", buffering=0) as filler:  # another writer takes the room
                try:
                    while True:
                        filler.write(b"\0" * 256 * 1024)
                except OSError as err:  # the run writes too: fill until full, then hand back 64 KB
                    assert err.errno == errno.ENOSPC, err
                filler.truncate(max(0, os.fstat(filler.fileno()).st_size - 64 * 1024))
            assert proc.wait(timeout=300) == 2
        text = (tmp_path / "out.txt").read_text()
        last = text.strip().splitlines()[-1]
        assert last.startswith("alignprop: error: ray.storage_path: "), last
        assert "the last complete checkpoint is kept" in last, last
        assert "Traceback" not in text, text[-3000:]
        kept = sorted(p for p in (disk / "fill").glob("checkpoint_*") if p.is_dir())
        assert kept and verify_checkpoint(kept[-1]) is None, "the last complete checkpoint is whole"
        from mlflow import MlflowClient

        (run,) = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(["1"])
        assert run.info.status == "FAILED"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
