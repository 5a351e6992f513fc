"""Errors the CLI prints as one line (exit code 2), importable without torch, Ray or MLflow."""


class RunBusyError(Exception):
    """Another process is running the same run name (the storage lock or a fresh MLflow heartbeat)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds files alignprop never loads (pickles can run code on unpickling)."""
