"""Prompt files: a path, a file shipped in platform/prompts/, or a public prompt set fetched once.

    read_prompt_file("toy_eval.txt")                        # shipped: platform/prompts/toy_eval.txt
    alignprop train --config sd15-hps                       # trainer.prompt_file: hps_v2_all.txt (public)
    alignprop train --config sd15-hps trainer.prompt_file=/data/hps_v2_all.txt   # offline: a local copy

A file is UTF-8 text, one prompt per line, `#` starts a comment; anything else is a one-line
`ConfigError` naming the field. Public prompt sets: like reward weights, these live elsewhere and are not redistributed
here. A name below that is
neither a local file nor shipped in platform/prompts/ is downloaded to
`$ALIGNPROP_CACHE` (default `~/.cache/alignprop`)`/prompts/<name>` on first use; offline, the
error names the source and the option to point at a local file.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ConfigError, require

PROMPT_DIR = Path(__file__).parent / "prompts"

_ALIGNPROP = "https://raw.githubusercontent.com/mihirp1998/AlignProp/main/assets"
_HPDV2 = "https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark"

# name → (source URL, format). The official AlignProp HPS runs train on hps_v2_all.txt and evaluate
# on hps_v2_all_eval.txt (assets/ of mihirp1998/AlignProp); the HPSv2 benchmark has 4 styles × 800
# prompts (benchmark/*.json of the zhwang/HPDv2 dataset, what `hpsv2.evaluate` downloads).
REMOTE_PROMPT_SETS: dict[str, tuple[str, str]] = {
    "hps_v2_all.txt": (f"{_ALIGNPROP}/hps_v2_all.txt", "text"),
    "hps_v2_all_eval.txt": (f"{_ALIGNPROP}/hps_v2_all_eval.txt", "text"),
    **{f"hpsv2_benchmark_{style}.txt": (f"{_HPDV2}/{style}.json", "json")
       for style in ("anime", "concept-art", "paintings", "photo")},
}


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNPROP_CACHE", "~/.cache/alignprop")).expanduser() / "prompts"


def fetch_prompt_set(name: str, field_name: str = "trainer.prompt_file", timeout_s: float = 20.0) -> Path:
    """The cached text file of a remote prompt set (downloaded now if missing)."""
    url, kind = REMOTE_PROMPT_SETS[name]
    target = cache_dir() / name
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            data = reply.read()
        prompts = json.loads(data) if kind == "json" else data.decode("utf-8").splitlines()
        text = "\n".join(p.strip() for p in prompts if isinstance(p, str) and p.strip()) + "\n"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"{field_name}: cannot fetch {name} from {url} ({reason}); accepted: a local copy, "
                          f"{field_name}=/path/to/{name} (download it from that address)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".part{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)  # atomic: a concurrent reader sees the whole file or none
    return target


def prompt_path(name: str, field_name: str = "trainer.prompt_file") -> Path:
    """A prompt file: an absolute path, a path relative to the cwd, a file shipped in
    platform/prompts/, or a public prompt set fetched once into the cache (below)."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if path.exists():
        return path.resolve()
    if not (PROMPT_DIR / name).is_file() and name in REMOTE_PROMPT_SETS:
        return fetch_prompt_set(name, field_name)
    return PROMPT_DIR / name


def read_prompt_file(name: str, field_name: str = "trainer.prompt_file") -> list[str]:
    """Non-empty, non-comment lines of a UTF-8 text file; ConfigError (one line) otherwise."""
    path = prompt_path(name, field_name)
    known = ", ".join(sorted([p.name for p in PROMPT_DIR.glob("*.txt")] + list(REMOTE_PROMPT_SETS)))
    require(path.is_file(), field_name, f"no such file {name!r}; accepted: a path or one of {known}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    require("\0" not in text, field_name,
            f"{str(path)!r} is not UTF-8 text; accepted: a text file, one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    require(bool(prompts), field_name,
            f"{str(path)!r} has no prompts; accepted: a text file, one prompt per line (# starts a comment)")
    return prompts
