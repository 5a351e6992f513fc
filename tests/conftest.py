"""Shared fixtures: a fresh tiny pipeline per test (tests add LoRA to it), a single-process DeepSpeed world, paths."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

torch.set_num_threads(1)  # faster than 2 for tiny models on 2 cores (NOTES.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: the venv's bin first, no inherited Ray/MLflow targets."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="session")
def deepspeed_world():
    """A one-process world, as a launcher would set it up (DeepSpeed needs the env vars): NCCL where
    CUDA is (`pytest -m gpu`), gloo elsewhere."""
    import torch.distributed as dist

    from alignprop.trainers.engine import single_process_world

    single_process_world(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    yield
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.destroy_process_group()  # else NCCL warns at exit that the group leaks


@pytest.fixture()
def tiny_pipe():
    from alignprop.platform.config import ModelSection
    from alignprop.platform.models import load_pipeline

    return load_pipeline(ModelSection(tiny=True))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run where CUDA is available and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
