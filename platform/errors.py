"""Errors the CLI prints as one line (exit code 2), importable without torch, Ray or MLflow."""


class ConfigError(ValueError):
    """A bad config value or argument; the message names the field and the accepted values."""


class RunBusyError(Exception):
    """Another process is running the same run name (the storage lock or a fresh MLflow heartbeat)."""


class RunFailedError(Exception):
    """A run stopped for a reason the user can act on (raised in a worker, printed by the driver as one line)."""


class StorageFullError(RunFailedError):
    """`ray.storage_path` cannot hold the next checkpoint, or a checkpoint there is incomplete."""


class NonFiniteError(RunFailedError):
    """The loss, the gradient norm or the LoRA weights became NaN or infinite."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds files alignprop never loads (pickles can run code on unpickling)."""


def require(ok: bool, field_name: str, message: str) -> None:
    """Raise `ConfigError("<field>: <message>")` unless `ok` (the message says what is accepted)."""
    if not ok:
        raise ConfigError(f"{field_name}: {message}")
