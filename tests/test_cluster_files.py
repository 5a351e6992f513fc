"""Static checks of the deployment files in cluster/ (no cloud, no Kubernetes, no Ray cluster).

Every YAML parses; the `ray up` configs pass Ray's own cluster-config schema; the KubeRay
manifests have the expected kinds; runtime_env.yaml keeps the venv out of the upload; every
`alignprop train --config NAME` that a cluster file mentions names a preset in platform/configs/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PRESETS = ROOT / "platform" / "configs"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))
RAY_UP_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_KINDS = {"kuberay-raycluster.yaml": "RayCluster", "kuberay-rayjob.yaml": "RayJob"}
TRAIN_COMMAND = re.compile(r"alignprop\s+train\s+--config[\s=]+([A-Za-z0-9_.\-]+)")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def cluster_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(CLUSTER.iterdir()) if p.is_file()}


def mentioned_presets() -> list[str]:
    return sorted({name for text in cluster_texts().values() for name in TRAIN_COMMAND.findall(text)})


def test_expected_files_exist():
    for name in [*RAY_UP_FILES, *KUBERAY_KINDS, "runtime_env.yaml", "Dockerfile", "README.md"]:
        assert (CLUSTER / name).is_file(), name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses_to_a_mapping(path: Path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_shape(name: str):
    cfg = load(name)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, f"{name}: missing {key}"
    assert cfg["provider"]["type"] == name.removesuffix(".yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert any(v.get("max_workers", 0) > 0 for v in workers.values()), "no worker type can scale up"
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= cfg["max_workers"]
    # Token auth on every node: the token file is mounted and every start command enables it.
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in cmd for cmd in cfg[key]), key
    # The dashboard / job API stays on the head's loopback (reached through `ray dashboard`).
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_passes_ray_schema(name: str):
    """Ray's own check (`ray up` runs it): ray-schema.json after filling in provider defaults."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(load(name)))


@pytest.mark.parametrize("name,kind", sorted(KUBERAY_KINDS.items()))
def test_kuberay_manifest(name: str, kind: str):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    spec = doc["spec"]
    if kind == "RayJob":
        assert spec["shutdownAfterJobFinishes"] is True
        assert TRAIN_COMMAND.search(spec["entrypoint"])
        spec = spec["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    groups = spec["workerGroupSpecs"]
    gpu_containers = [
        c for g in groups for c in g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    ]
    assert gpu_containers, "no worker group asks for nvidia.com/gpu"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    for container in [*head, *gpu_containers]:
        assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container.get("env", [])}, container["name"]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_runtime_env():
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    for pattern in (".venv", ".git", "mlflow.db", "mlruns", "ray_results"):
        assert pattern in env["excludes"], pattern
    assert "pip" not in env and "conda" not in env, "install into the image, not per job"
    assert set(env["env_vars"]) >= {"MLFLOW_TRACKING_URI", "OMP_NUM_THREADS"}
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray wants string env values"


def test_ray_versions_agree():
    """The image tags, KubeRay's rayVersion and the pinned installs all name one Ray version."""
    versions = set()
    for text in cluster_texts().values():
        versions |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        versions |= set(re.findall(r"ray\[default,train,tune\]==(\d+\.\d+\.\d+)", text))
        versions |= set(re.findall(r"RAY_VERSION=(\d+\.\d+\.\d+)", text))
    for name in KUBERAY_KINDS:
        spec = load(name)["spec"]
        versions.add(spec.get("rayClusterSpec", spec)["rayVersion"])
    assert len(versions) == 1, versions


def test_dockerfile_pins_torch_first_and_runs_unprivileged():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}", text, re.M)
    torch_at = text.index('pip install "torch==${TORCH_VERSION}"')
    project_at = text.index('pip install "ray[default,train,tune]==${RAY_VERSION}" .')
    assert torch_at < project_at
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_cluster_files_mention_train_commands():
    assert mentioned_presets(), "no `alignprop train --config NAME` found in cluster/"


@pytest.mark.parametrize("preset", mentioned_presets())
def test_mentioned_preset_exists(preset: str):
    available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert (PRESETS / f"{preset}.yaml").is_file(), f"cluster/ mentions --config {preset}; presets: {available}"
