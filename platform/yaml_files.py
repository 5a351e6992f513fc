"""YAML that cannot blow up: aliases and the expanded size of what a file holds are bounded before
anything walks it (a "billion laughs" file of nested aliases is a few hundred bytes that expand to
gigabytes when copied, as OmegaConf and our validators do).

    data = load_bounded(path.read_text(), "tune_spaces/k_lr.yaml")   # yaml.safe_load, bounded
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

MAX_ALIASES = 100  # alias references (`*name`) in one file
MAX_NODES = 100_000  # values once every alias is expanded
MAX_BYTES = 4 * 2**20


class _CountingLoader(yaml.SafeLoader):
    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} YAML aliases")
        return super().compose_node(parent, index)


def expanded_size(data: Any, limit: int = MAX_NODES) -> int:
    """How many values `data` holds with every shared (aliased) part counted each time it appears;
    counted once per distinct object, so a file of nested aliases costs its own size, not its expansion."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if isinstance(node, dict):
            total = 1 + sum(size(k) + size(v) for k, v in node.items())
        elif isinstance(node, list):
            total = 1 + sum(size(v) for v in node)
        else:
            total = 1
        sizes[id(node)] = min(total, limit + 1)
        return sizes[id(node)]

    return size(data)


def load_bounded(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, refused in one line (naming `where`) past the bounds above."""
    if len(text.encode()) > MAX_BYTES:
        raise ConfigError(f"{where}: {len(text.encode())} bytes; accepted: a YAML file of at most {MAX_BYTES} bytes")
    loader = _CountingLoader(text)
    try:
        data = loader.get_single_data()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}; accepted: a plain YAML file (few or no aliases)") from None
    finally:
        loader.dispose()
    if expanded_size(data) > MAX_NODES:
        raise ConfigError(f"{where}: expands to more than {MAX_NODES} values (nested YAML aliases); accepted: a plain "
                          "YAML file")
    return data
