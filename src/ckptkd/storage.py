"""Crash-safe files: everything is written to a temporary name, fsynced and renamed into place.

A reader therefore sees either the old file or the new one, never half of one. Weights are safetensors; nothing is
ever unpickled here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def shared_permissions(path: str | Path, *, directory: bool = False) -> None:
    """Give a file (or folder) made by mkstemp/mkdtemp, which are private (0600/0700), the permissions an ordinary
    file gets under the umask, so other users of a shared results folder can read it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what writes killed half-way (power loss, SIGKILL) left in `folder`: `.NAME.*.tmp` files never renamed
    into place. Only for a folder no other process is writing to; returns what was removed."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


METADATA_KEY = "ckptkd"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write tensors as safetensors atomically; returns the file's sha256.

    The metadata travels as one JSON string under one key: safetensors writes several keys in a random order, and
    the same weights must always give the same bytes (and so the same sha256).
    """
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata is not None else None
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, refusing it if its sha256 differs from the one recorded for it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise UserError(f"checkpoint {path} does not match its manifest (sha256 {actual[:12]}…, expected "
                            f"{expected_sha256[:12]}…): the file was changed or truncated")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        return json.loads(header.get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
