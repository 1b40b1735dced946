"""Atomic files: every report, table and checkpoint is written next to its target and renamed over it, so a kill
at any moment leaves either the previous file or the new one, never half a file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def write_atomically(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call `write(stream)` on a temporary file beside `path` ("w" text or "wb" binary), fsync, then rename it
    over `path`. A failed write (disk full, ...) removes the temporary file, leaves `path` as it was and raises an
    OSError naming `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # the rename must not land before the data on a crash
        os.replace(temporary, target)
    except BaseException as exc:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {str(target)!r} ({exc.strerror or exc}); the previous "
                                     "version, if any, is unchanged") from exc
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    write_atomically(path, lambda stream: stream.write(text))


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    write_atomically(path, lambda stream: json.dump(obj, stream, indent=1, allow_nan=True))


def save_atomic(obj: object, path: str | os.PathLike) -> None:
    """torch.save, atomically: never a torn checkpoint."""
    write_atomically(path, lambda stream: torch.save(obj, stream), "wb")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read back (truncated, overwritten, not a torch file)."""


def _check_records(path: str | os.PathLike) -> None:
    """Read every record of a zip checkpoint (torch.save's format) through zipfile, which checks each record's
    CRC-32 and raises BadZipFile on a mismatch: torch.load does not, and reads a flipped bit in tensor data back
    as a wrong value. Records stored without a CRC (0) are skipped; a file that is not a zip is left to torch.load."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            with archive.open(info) as record:
                while record.read(1 << 24):
                    pass


# torch.load on a damaged file: RuntimeError (no central directory), OSError EINVAL (a truncated file of some sizes:
# a seek before its start), EOFError (empty), KeyError / IndexError / UnpicklingError / UnicodeDecodeError (bytes
# that are not a pickle); zipfile on a record with a wrong CRC-32: BadZipFile. Not there, or not readable, is no
# corruption: those OSErrors pass through.
_UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError,
               zipfile.BadZipFile)
_ACCESS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint written by `save_atomic`: tensors and plain containers only (weights_only=True), so a
    file from elsewhere cannot run code. A file that is truncated, overwritten or has a record whose CRC-32 does
    not match raises CorruptCheckpointError naming it."""
    try:
        _check_records(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except _ACCESS:
        raise
    except _UNREADABLE as exc:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted and cannot be read "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


LOCK_FILE = ".biasfast.lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_lock(path: str) -> tuple[int, str] | None:
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None  # vanished or half-written: treated as stale


def _age_seconds(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files of writes a kill interrupted (only call this while holding the folder lock)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "out") -> Iterator[None]:
    """Hold `folder` for one process: a second one refuses with a clear error instead of interleaving writes.

    The lock file holds "pid host"; a lock left by a process that is gone (killed) on this host is stale and
    taken over. Released on exit, also on an exception."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None and _age_seconds(path) < 10:
                holder = (-1, "unknown (lock being written)")  # its writer is between create and write
            if holder is not None and (holder[1] != socket.gethostname() or _process_alive(holder[0])):
                raise FileExistsError(
                    f"{what}: {str(folder)!r} is in use by another biasfast process (pid {holder[0]} on "
                    f"{holder[1]}, lock {path!r}); wait for it to finish, or delete the lock file if that process "
                    "is gone") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w") as f:
            f.write(me)
        break
    else:
        raise OSError(errno.EBUSY, f"{what}: could not take the lock {path!r}")
    try:
        yield
    finally:
        if _read_lock(path) == (os.getpid(), socket.gethostname()):
            os.unlink(path)
