"""Errors the CLI prints as one line (exit code 2), importable without torch, Ray or MLflow."""


class ConfigError(ValueError):
    """A bad config value or argument; the message names the field and the accepted values."""


class RunBusyError(Exception):
    """Another process is running the same run name (the storage lock or a fresh MLflow heartbeat)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds files alignprop never loads (pickles can run code on unpickling)."""


def require(ok: bool, field_name: str, message: str) -> None:
    """Raise `ConfigError("<field>: <message>")` unless `ok` (the message says what is accepted)."""
    if not ok:
        raise ConfigError(f"{field_name}: {message}")
