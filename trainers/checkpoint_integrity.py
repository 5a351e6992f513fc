"""Checkpoints that are whole or known to be broken: each rank's files fsync'd and listed with their
sizes and sha256 in a manifest written last (`manifest_rank<r>.json`), verified on resume.

    write_manifest(directory, rank)           # after the rank's files are written, before Ray copies them
    problem = verify_checkpoint(directory)    # None, or what is wrong ("optimizer.safetensors: 812 of 5632 bytes")
    directory, skipped = newest_valid(resume_dir)   # the newest whole checkpoint of the run, and the broken ones

A disk that fills while Ray copies a checkpoint into `ray.storage_path` leaves files truncated inside a
directory that looks complete; Ray may still offer it on resume. `verify_checkpoint` catches that:
every manifest must match its files, every safetensors file must be as long as its header says, every
JSON file must parse, and the files a resume reads must be there. Checkpoints written before manifests
existed are checked by the last three rules. Cheap to import: no DeepSpeed, no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Optional

MANIFEST = "manifest_rank{rank}.json"
REQUIRED = ("engine_state.json", "trainer_state.json", "optimizer.safetensors", "pytorch_lora_weights.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: str | os.PathLike, rank: int, files: list[str]) -> None:
    """fsync `files` (this rank's, relative to `directory`), then write their manifest last, fsync'd."""
    root = Path(directory)
    entries = {}
    for name in sorted(files):
        _fsync(root / name)
        entries[name] = {"bytes": (root / name).stat().st_size, "sha256": _sha256(root / name)}
    manifest = root / MANIFEST.format(rank=rank)
    manifest.write_text(json.dumps({"format": "alignprop-manifest", "version": 1, "files": entries}))
    _fsync(manifest)
    _fsync(root)


def _safetensors_problem(path: Path) -> Optional[str]:
    """Whether the file is as long as its header says (the header's last data offset)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return f"{path.name}: header of {length} bytes in a {size}-byte file"
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"{path.name}: not a readable safetensors file ({size} bytes)"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + length + end
    return None if size == expected else f"{path.name}: {size} of {expected} bytes"


def verify_checkpoint(directory: str | os.PathLike) -> Optional[str]:
    """None if the checkpoint is whole, else one phrase saying what is wrong with it."""
    root = Path(directory)
    if not root.is_dir():
        return "not a directory"
    for name in REQUIRED:
        if not (root / name).is_file():
            return f"{name} is missing"
    for manifest in sorted(root.glob(MANIFEST.format(rank="*"))):
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{manifest.name} is not readable"
        for name, entry in entries.items():
            path = root / name
            if not path.is_file():
                return f"{name} is missing (listed in {manifest.name})"
            if path.stat().st_size != entry["bytes"]:
                return f"{name}: {path.stat().st_size} of {entry['bytes']} bytes"
            if _sha256(path) != entry["sha256"]:
                return f"{name}: contents differ from {manifest.name} (sha256)"
    for path in sorted(root.rglob("*")):
        if path.suffix == ".json" and path.is_file():
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                return f"{path.name} is not valid JSON"
        elif path.suffix == ".safetensors" and path.is_file():
            problem = _safetensors_problem(path)
            if problem:
                return problem
    return None


def newest_valid(resume_dir: str | os.PathLike) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the newest whole checkpoint among `resume_dir` and its siblings in the run's storage folder, or
    None; the broken ones newer than it, with what is wrong). Ray names checkpoints
    `checkpoint_<timestamp>`, so names sort by age; a sibling newer than Ray's latest is one written
    before an interruption kept Ray from recording it."""
    chosen = Path(resume_dir)
    siblings = sorted((p for p in chosen.parent.glob("checkpoint_*") if p.is_dir()),
                      reverse=True) if chosen.name.startswith("checkpoint_") else [chosen]
    broken = []
    for candidate in siblings or [chosen]:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate, broken
        broken.append((candidate, problem))
    return None, broken
