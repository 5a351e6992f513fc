"""The tree is the import tree: every package folder is packaged, imports inside the package are
relative and point one way (no cycles), and a wheel carries every module and the toy world's weights.

With setuptools' `package-dir` mapping a sub-package missing from `[tool.setuptools] packages`
vanishes from the wheel (and the cluster image) while the editable install still finds it: these
tests catch that before a user does.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"platform": "alignprop.platform", "trainers": "alignprop.trainers", "rewards": "alignprop.rewards"}
# MLflow loads this file as a script ("models from code"): relative imports cannot work there.
ABSOLUTE_ALLOWED = {"platform/mlflow_model.py"}
SHIPPED_WEIGHTS = "alignprop/platform/toy_world/pretrained/unet/diffusion_pytorch_model.safetensors"


def listed_packages() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def package_folders() -> dict[str, Path]:
    """import name → folder, for every folder of the package holding .py files."""
    found = {}
    for root, name in ROOTS.items():
        for folder in [REPO / root, *sorted(p for p in (REPO / root).rglob("*") if p.is_dir())]:
            if "__pycache__" not in folder.parts and any(folder.glob("*.py")):
                found[".".join([name, *folder.relative_to(REPO / root).parts])] = folder
    return found


def package_modules() -> dict[str, Path]:
    """module name → file, for every module of the package."""
    modules = {}
    for package, folder in package_folders().items():
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that `module` imports (at module level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
        for alias in node.names:
            name = f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_every_package_folder_is_listed_in_pyproject():
    missing = sorted(set(package_folders()) - listed_packages())
    assert not missing, f"sub-packages missing from [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_package_folder_is_a_regular_package_but_platform_itself():
    """platform/__init__.py would shadow the standard library's `platform` (DESIGN.md); every other
    folder of modules has an __init__.py, so `packages` and the import tree agree."""
    assert not (REPO / "platform" / "__init__.py").exists()
    without = [str(f.relative_to(REPO)) for name, f in package_folders().items()
               if name != "alignprop.platform" and not (f / "__init__.py").exists()]
    assert not without, without


def test_no_absolute_alignprop_imports_inside_the_package():
    offenders = []
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            if str(path.relative_to(REPO)) in ABSOLUTE_ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if any(n.split(".")[0] == "alignprop" for n in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"use relative imports inside the package: {offenders}"


def test_the_import_graph_has_no_cycles():
    """A package's __init__ re-exporting its own modules is not a cycle; anything else that imports
    back into its importer (also from inside a function) is."""
    modules = package_modules()
    graph = {m: {t for t in imports_of(m, p, modules)
                 if not (p.name == "__init__.py" and t.startswith(m + "."))} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """`pip wheel --no-deps .` of the tracked files (a copy: the build writes build/ and *.egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    src = tmp / "src"
    for name in filter(None, (f.decode() for f in files)):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "out"),
                    str(src)], check=True, capture_output=True, timeout=600)
    return zipfile.ZipFile(next((tmp / "out").glob("*.whl")))


def test_the_wheel_holds_every_module_and_the_toy_worlds_weights(wheel):
    names = set(wheel.namelist())
    expected = {f"alignprop/{p.relative_to(REPO)}" for p in package_modules().values()}
    assert not sorted(expected - names), f"modules missing from the wheel: {sorted(expected - names)[:10]}"
    assert SHIPPED_WEIGHTS in names, "the toy world's shipped UNet is not in the wheel"
    assert any(n.startswith("alignprop/platform/configs/") and n.endswith(".yaml") for n in names), "presets"
    assert any(n.startswith("alignprop/tune_spaces/") and n.endswith(".yaml") for n in names), "tune spaces"
