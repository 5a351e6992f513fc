"""Prompt sets that are not shipped: fetched once from their public source on the driver, cached.

    alignprop train --config sd15-hps                       # trainer.prompt_file: hps_v2_all.txt
    alignprop train --config sd15-hps trainer.prompt_file=/data/hps_v2_all.txt   # offline: a local copy

Like reward weights, these live elsewhere and are not redistributed here. A name below that is
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
    from alignprop.platform.config import ConfigError

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
