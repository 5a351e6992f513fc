"""Static checks of the deployment files in cluster/ (no cloud, no Kubernetes, no Ray cluster).

Every YAML parses; the `ray up` configs pass Ray's own cluster-config schema; the KubeRay
manifests have the expected kinds; runtime_env.yaml keeps the venv out of the upload; every
`alignprop train --config NAME` that a cluster file mentions names a preset in platform/configs/.
Every GPU target uses the one torch / CUDA / driver pairing of cluster/torch-build.env (the
Makefile too), installs the project with its `tune` extra, and the image has what pyproject names.
"""

from __future__ import annotations

import re
import shlex
import tomllib
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
PAIRING_FILE = CLUSTER / "torch-build.env"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def cluster_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(CLUSTER.iterdir()) if p.is_file()}


def mentioned_presets() -> list[str]:
    return sorted({name for text in cluster_texts().values() for name in TRAIN_COMMAND.findall(text)})


def pairing() -> dict[str, str]:
    """cluster/torch-build.env: KEY=VALUE lines, `#` comments."""
    lines = [ln.strip() for ln in PAIRING_FILE.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def dockerfile_resolved() -> str:
    """The Dockerfile with every ${ARG} replaced by its default (what a plain `docker build` uses)."""
    text = (CLUSTER / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text, re.M))
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), text)


def dockerfile_instructions(text: str) -> list[str]:
    """One string per instruction: comments dropped, backslash continuations joined."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ins.strip() for ins in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if ins.strip()]


def pip_installs() -> dict[str, list[list[str]]]:
    """Every `pip install` command (as argv) of the files that install software onto the nodes."""
    commands: dict[str, list[str]] = {name: [] for name in [*RAY_UP_FILES, "Dockerfile"]}
    for name in RAY_UP_FILES:
        cfg = load(name)
        for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
            commands[name] += cfg.get(key) or []
    commands["Dockerfile"] = [ins[len("RUN "):] for ins in dockerfile_instructions(dockerfile_resolved())
                              if ins.startswith("RUN ")]
    installs: dict[str, list[list[str]]] = {}
    for name, cmds in commands.items():
        parts = [part for cmd in cmds for part in re.split(r"&&|;", cmd)]
        argvs = [shlex.split(part) for part in parts if re.search(r"\bpip3? install\b", part)]
        installs[name] = [argv[argv.index("install") + 1:] for argv in argvs]
    return installs


def project_targets(argv: list[str]) -> list[str]:
    """The arguments of one `pip install` that name this project (the checkout or `.`)."""
    return [a for a in argv if re.fullmatch(r"(\.|\S*alignprop)(\[[\w,]+\])?", a)]


def test_expected_files_exist():
    for name in [*RAY_UP_FILES, *KUBERAY_KINDS, "runtime_env.yaml", "Dockerfile", "README.md", "torch-build.env"]:
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
    torch_at = text.index('pip install "torch==${TORCH_VERSION}+${TORCH_CUDA}"')
    project_at = text.index('pip install "ray[default,train,tune]==${RAY_VERSION}" ".[tune]"')
    assert torch_at < project_at
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_header_says_it_needs_buildkit():
    """`# syntax=` and cluster/Dockerfile.dockerignore are BuildKit features: the classic builder
    would ignore the Dockerfile-specific .dockerignore and send .venv (2 GB) with the context."""
    text = (CLUSTER / "Dockerfile").read_text()
    header = text[: text.index("\nARG ")]
    assert text.startswith("# syntax=docker/dockerfile:")
    assert "BuildKit" in header and "Dockerfile.dockerignore" in header
    assert (CLUSTER / "Dockerfile.dockerignore").is_file()


def test_dockerfile_copies_what_pyproject_names():
    """`pip install .` in the image needs every package-dir folder and the `readme` file."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"],
              *project["tool"]["setuptools"]["package-dir"].values()}
    copied = set()
    for ins in dockerfile_instructions((CLUSTER / "Dockerfile").read_text()):
        if ins.startswith("COPY "):
            args = [a for a in ins.split()[1:] if not a.startswith("--")]
            copied |= {src.rstrip("/").removeprefix("./") for src in args[:-1]}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignored = {ln.strip().rstrip("/") for ln in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()}
    assert not needed & ignored, f"Dockerfile.dockerignore drops {sorted(needed & ignored)}"
    for path in needed:
        assert (ROOT / path).exists(), path


def test_pairing_file_is_one_consistent_pairing():
    p = pairing()
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["TORCH_VERSION"])
    cuda = re.fullmatch(r"cu(\d\d)(\d+)", p["TORCH_CUDA"])
    assert cuda, p["TORCH_CUDA"]
    assert p["CUDA_VERSION"] == f"{int(cuda.group(1))}.{cuda.group(2)}"
    assert p["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/{p['TORCH_CUDA']}"
    assert int(p["NVIDIA_DRIVER_MIN"]) >= 525, "CUDA 12.x needs driver >= 525 even with minor-version compat"
    if cuda.group(1) == "13":
        assert int(p["NVIDIA_DRIVER_MIN"]) >= 580, "CUDA 13.x needs driver >= 580"
    image = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu(\d\d)\d+", p["RAY_IMAGE"])
    assert image, "name the Ray image's CUDA (-cuXYZ), not the -gpu alias (CUDA 12.1)"
    assert image.group(1) == p["RAY_VERSION"]
    assert image.group(2) == cuda.group(1), "the image's nvcc must have torch's CUDA major (DeepSpeed JIT ops)"


def test_makefile_installs_the_pairing_torch():
    text = (ROOT / "Makefile").read_text()
    p = pairing()
    assert re.search(r"^TORCH_VERSION \?= (\S+)$", text, re.M).group(1) == p["TORCH_VERSION"]
    default = re.search(r"^TORCH_BUILD \?= (.*)$", text, re.M).group(1)
    assert "nvidia-smi" in default
    gpu_tag, cpu_tag = re.search(r"nvidia-smi[^)]*\),(\w+),(\w+)\)", default).groups()
    assert (gpu_tag, cpu_tag) == (p["TORCH_CUDA"], "cpu")
    assert '"torch==$(TORCH_VERSION)+$(TORCH_BUILD)"' in text
    assert "https://download.pytorch.org/whl/$(TORCH_BUILD)" in text


def test_torch_installs_use_the_pairing():
    p = pairing()
    pin = f"torch=={p['TORCH_VERSION']}+{p['TORCH_CUDA']}"
    for name, installs in pip_installs().items():
        torch_installs = [argv for argv in installs if any(a.startswith("torch==") for a in argv)]
        assert torch_installs, f"{name}: no pinned torch install"
        for argv in torch_installs:
            assert pin in argv, f"{name}: {argv}"
            assert argv[argv.index("--index-url") + 1] == p["TORCH_INDEX_URL"], f"{name}: {argv}"
    for name, text in cluster_texts().items():
        if name != "README.md":
            pins = set(re.findall(r"torch==([\w.+${}]+)", text)) - {"${TORCH_VERSION}+${TORCH_CUDA}"}
            assert pins <= {pin.removeprefix("torch==")}, f"{name}: {pins}"


def test_project_installs_have_the_tune_extra_and_pin_ray():
    """Optuna (the `tune` extra) on every node, and pip never replaces the image's Ray."""
    ray_pin = f"ray[default,train,tune]=={pairing()['RAY_VERSION']}"
    for name, installs in pip_installs().items():
        project = [argv for argv in installs if project_targets(argv)]
        assert project, f"{name}: the project is not installed"
        for argv in project:
            assert all(t.endswith("[tune]") for t in project_targets(argv)), f"{name}: {argv}"
            assert ray_pin in argv, f"{name}: {argv}"


def test_ray_images_use_the_pairing():
    image = pairing()["RAY_IMAGE"]
    for name in RAY_UP_FILES:
        assert load(name)["docker"]["image"] == image, name
    froms = [ins.split()[1] for ins in dockerfile_instructions(dockerfile_resolved()) if ins.startswith("FROM ")]
    assert froms == [image]
    for name, text in cluster_texts().items():
        assert not re.search(r"rayproject/ray:\S*-gpu\b", text), f"{name}: the -gpu alias is CUDA 12.1"


def test_dockerfile_defaults_are_the_pairing():
    text = (CLUSTER / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text, re.M))
    p = pairing()
    assert defaults["TORCH_VERSION"] == p["TORCH_VERSION"]
    assert defaults["TORCH_CUDA"] == p["TORCH_CUDA"]
    assert defaults["RAY_VERSION"] == p["RAY_VERSION"]


def test_vm_images_carry_the_minimum_driver():
    """Every node of the `ray up` configs boots an image whose NVIDIA driver runs torch's CUDA."""
    p = pairing()
    for node_type, spec in load("aws.yaml")["available_node_types"].items():
        assert spec["node_config"]["ImageId"] == f"resolve:ssm:{p['AWS_AMI_SSM_PARAMETER']}", node_type
    assert "base-oss-nvidia-driver-gpu" in p["AWS_AMI_SSM_PARAMETER"]
    for node_type, spec in load("gcp.yaml")["available_node_types"].items():
        images = [d["initializeParams"]["sourceImage"] for d in spec["node_config"]["disks"] if d.get("boot")]
        family = f"projects/deeplearning-platform-release/global/images/family/{p['GCP_IMAGE_FAMILY']}"
        assert images == [family], node_type
    driver = re.search(r"-nvidia-(\d+)$", p["GCP_IMAGE_FAMILY"])
    assert driver and int(driver.group(1)) >= int(p["NVIDIA_DRIVER_MIN"]), p["GCP_IMAGE_FAMILY"]


def test_kuberay_images_are_the_dockerfile_build():
    """The manifests run the image built from cluster/Dockerfile; its tag names Ray and the CUDA build."""
    p = pairing()
    images = set()
    for name in KUBERAY_KINDS:
        spec = load(name)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
        text = (CLUSTER / name).read_text()
        assert f">= {p['NVIDIA_DRIVER_MIN']}" in text, f"{name}: say which driver the GPU nodes need"
    assert len(images) == 1, images
    (image,) = images
    assert image.endswith(f"-ray{p['RAY_VERSION']}-{p['TORCH_CUDA']}"), image
    for name in ("Dockerfile", "README.md"):
        assert f"-t {image} ." in (CLUSTER / name).read_text(), f"{name}: build command for {image}"


def test_cluster_files_mention_train_commands():
    assert mentioned_presets(), "no `alignprop train --config NAME` found in cluster/"


@pytest.mark.parametrize("preset", mentioned_presets())
def test_mentioned_preset_exists(preset: str):
    available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert (PRESETS / f"{preset}.yaml").is_file(), f"cluster/ mentions --config {preset}; presets: {available}"
