"""Crash-safe, self-verifying files.

Everything is written to a temporary name, fsynced and renamed into place, so a reader sees either the old file or
the new one, never half of one. Every file ckptkd writes can also tell when it was damaged afterwards (a flipped
byte, a truncated copy):
  safetensors   the header carries a sha256 of the metadata and every tensor's name, dtype, shape and bytes
  sealed JSON   (manifests, analyses) a top-level "checksum" of the rest of the object
and readers refuse a file that does not match, naming it and what to do. Weights are safetensors; nothing is ever
unpickled here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..errors import UserError
from ..processes import pid_alive


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


# Fault injection for the crash campaign (benchmarks/crash_campaign.py): with CKPTKD_FAULT_KILL_WRITE=N, the N-th
# atomic write of the process writes half its bytes and the process kills itself with SIGKILL, mid-write. Unset, it
# does nothing.
_KILL_WRITE = int(os.environ.get("CKPTKD_FAULT_KILL_WRITE", "0") or 0)
_writes = 0


def _maybe_die_mid_write(f, data: bytes) -> None:
    global _writes
    _writes += 1
    if _writes == _KILL_WRITE:
        import signal

        f.write(data[:len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's host and pid in the name tell a crashed write's leftover from a live one (remove_stale_temporaries).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_name(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            if _KILL_WRITE:
                _maybe_die_mid_write(f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and error.filename is None:
            # A full disk fails inside write(), which names no file: name the one that could not be written.
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    _fsync_dir(path.parent)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def temporary_name(path: Path) -> str:
    """The prefix of a temporary written beside `path` (`.NAME.HOST-PID.`, then a random part and `.tmp`): the
    writer's host and pid in the name tell a crashed write's leftover from a live one (remove_stale_temporaries)."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and write (then remove) a temporary in it: raises the OSError a later save would,
    before work is spent on what that save would hold. The probe is named as every temporary is, so a kill here
    leaves nothing `remove_stale_temporaries` would not remove."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=temporary_name(folder / "writable"), suffix=".tmp"):
        pass


def remove_stale_temporaries(folder: str | Path, *, shared: bool = False) -> list[Path]:
    """Delete what writes killed half-way (power loss, SIGKILL) left in `folder`: `.NAME.*.tmp` files never renamed
    into place, and run folders `import` was building (`.NAME.HOST-PID.*.tmp/`); returns what was removed.
    `shared`: other processes may be writing there right now (a teacher cache, an analysis cache, another import),
    so only temporaries whose writer is gone are removed: a process of this host that no longer runs, or a write
    older than an hour. A folder is removed only when its writer is known to be gone."""
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.tmp") if (p.is_file() and (not shared or _abandoned(p)))
                   or (p.is_dir() and _abandoned(p))) if folder.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def _abandoned(path: Path) -> bool:
    """Whether `path` is a ckptkd temporary (`.NAME.HOST-PID.RANDOM.tmp`) whose writer is gone."""
    parts = path.name.rsplit(".", 3)
    host, _, pid = parts[1].rpartition("-") if len(parts) == 4 else ("", "", "")
    if not host or not pid.isdigit():
        return False  # another program's file, or a ckptkd write from before writers were named: left alone
    try:
        if time.time() - path.stat().st_mtime > 3600:
            return True  # a write this old is dead, on any host (a shared file system)
    except FileNotFoundError:
        return False  # renamed into place meanwhile
    return host == _HOST and not pid_alive(int(pid))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# The largest JSON file ckptkd reads (a manifest, an analysis, an importer's trainer_state.json): its own are at most
# a few MB, and parsing takes about ten times a file's size in memory, so a larger one is refused unread.
MAX_JSON_BYTES = 256 * 2**20


def read_json(path: str | Path, what: str = "file", remedy: str = "") -> Any:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UserError(f"{what} {path} is {size / 2**20:,.0f} MiB; a JSON file ckptkd reads is at most "
                            f"{MAX_JSON_BYTES // 2**20} MiB{_then(remedy)}")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # ValueError: a JSONDecodeError, or an integer of more than 4,300 digits; RecursionError: nesting too deep
        said = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{what} {path} is not valid JSON ({said}){_then(remedy)}") from None


CHECKSUM = "checksum"


def _then(remedy: str) -> str:
    return f"; {remedy}" if remedy else ""


def json_checksum(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != CHECKSUM}
    return "sha256:" + sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_sealed_json(path: str | Path, obj: dict) -> None:
    """Write a JSON object with a checksum of itself, so a later edit or damage is noticed."""
    atomic_write_json(path, {**{k: v for k, v in obj.items() if k != CHECKSUM}, CHECKSUM: json_checksum(obj)})


def read_sealed_json(path: str | Path, what: str, *, remedy: str = "",
                     required: Callable[[dict], bool] = lambda _obj: True) -> Any:
    """Read a sealed JSON object (returned without its checksum), refusing it if its checksum does not match, or is
    missing where `required(obj)` says a file of that kind always has one (older versions wrote none)."""
    obj = read_json(path, what, remedy)
    if not isinstance(obj, dict):
        return obj  # the caller's schema check names what is wrong
    if CHECKSUM in obj:
        if obj[CHECKSUM] != json_checksum(obj):
            raise UserError(f"{what} {path} does not match its checksum: it was edited or damaged{_then(remedy)}")
        return {k: v for k, v in obj.items() if k != CHECKSUM}
    if required(obj):
        raise UserError(f"{what} {path} has no checksum: it was edited or damaged{_then(remedy)}")
    return obj


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


METADATA_KEY = "ckptkd"  # the metadata, one JSON string
SEAL = "seal"            # in it: a sha256 of the rest of the metadata and of every tensor's name, dtype, shape, bytes


def _tensor_digest(tensors: dict[str, torch.Tensor], metadata_text: str) -> str:
    digest = hashlib.sha256(metadata_text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write tensors as safetensors atomically, sealed (`load_tensors` checks the seal); returns the file's sha256.

    The metadata, seal included, travels as one JSON string under one key: safetensors writes several keys in a
    random order, and the same weights must always give the same bytes (so the same sha256).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {k: v for k, v in (metadata or {}).items() if k != SEAL}
    seal = _tensor_digest(tensors, json.dumps(metadata, sort_keys=True))
    data = save(tensors, metadata={METADATA_KEY: json.dumps({**metadata, SEAL: seal}, sort_keys=True)})
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _header(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError("the header is cut short")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a mapping")
    return header


def read_tensors(path: str | Path, *, what: str, remedy: str = "",
                 sealed: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a file `save_tensors` wrote, in one read, verified as `load_tensors` does."""
    return _read_tensors(path, None, what, remedy, sealed)


def load_tensors(path: str | Path, expected_sha256: str | None = None, *, what: str = "checkpoint",
                 remedy: str = "") -> dict[str, torch.Tensor]:
    """Read a safetensors file, refusing it if it is damaged: unreadable, its sha256 differs from the one recorded
    for it (`expected_sha256`), or its contents differ from the seal written with them (an unsealed file, from
    before seals or from another program, is read as it is)."""
    return _read_tensors(path, expected_sha256, what, remedy, sealed=False)[0]


def _read_tensors(path: str | Path, expected_sha256: str | None, what: str, remedy: str,
                  sealed: bool) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file missing: {path}{_then(remedy)}")
    data = path.read_bytes()
    if expected_sha256 is not None and (actual := sha256_bytes(data)) != expected_sha256:
        raise UserError(f"{what} {path} does not match its manifest (sha256 {actual[:12]}…, expected "
                        f"{expected_sha256[:12]}…): the file was changed or truncated{_then(remedy)}")
    try:
        header = _header(data).get("__metadata__") or {}
        tensors = load(data)
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
        if isinstance(metadata, dict) and SEAL in metadata:
            seal = metadata.pop(SEAL)
            if len(header) > 1 or seal != _tensor_digest(tensors, json.dumps(metadata, sort_keys=True)):
                raise ValueError("its contents do not match the seal written with them")
        elif sealed and (metadata is None or len(header) > 1):
            raise ValueError("it carries no ckptkd seal")
        # Otherwise written before seals (as good as its manifest's sha256), or another program's file (an import).
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RecursionError) as e:  # JSONDecodeError too
        raise UserError(f"{what} {path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        f"{_then(remedy)}") from None
    return tensors, metadata if isinstance(metadata, dict) else {}
