"""The shipped presets (platform/configs/*.yaml), light enough for the CLI's help: no torch, no models.

    list_presets()                  # ['sd15-aesthetic', ..., 'toy-count']
    resolve_preset("tiny-cpu")      # platform/configs/tiny-cpu.yaml; a YAML path is taken as given
    describe_preset("toy-count")    # the first sentence of its opening comment

Each preset begins with a comment that says what it is and shows the command that runs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(name_or_path: str) -> Path:
    """`tiny-cpu` → platform/configs/tiny-cpu.yaml; a path (has a / or a .yaml suffix) is taken as given."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}; accepted: a preset "
                              f"({', '.join(list_presets())}) or a YAML path")
        return path
    if name_or_path not in list_presets():
        raise ConfigError(f"--config: unknown preset {name_or_path!r}; accepted: {', '.join(list_presets())} "
                          "or a YAML path")
    return PRESET_DIR / f"{name_or_path}.yaml"


def describe_preset(name: str, width: int = 100) -> str:
    """The first sentence of the preset's opening comment (what it is), cut to `width` characters."""
    words = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  "):  # the comment ends, or its commands begin
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    sentence = re.split(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])", text)[0].rstrip(".")  # not at "et al. 2023"
    return sentence if len(sentence) <= width else sentence[:width - 1].rsplit(" ", 1)[0] + "…"
