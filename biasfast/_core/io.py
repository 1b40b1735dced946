"""Atomic files: every report, table and checkpoint is written next to its target and renamed over it, so a kill
at any moment leaves either the previous file or the new one, never half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def write_atomically(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call `write(stream)` on a temporary file beside `path` ("w" text or "wb" binary), fsync, then rename it
    over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # the rename must not land before the data on a crash
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    write_atomically(path, lambda stream: stream.write(text))


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    write_atomically(path, lambda stream: json.dump(obj, stream, indent=1, allow_nan=True))


def save_atomic(obj: object, path: str | os.PathLike) -> None:
    """torch.save, atomically: never a torn checkpoint."""
    write_atomically(path, lambda stream: torch.save(obj, stream), "wb")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `save_atomic`: tensors and plain containers only (weights_only=True), so a
    file from elsewhere cannot run code."""
    return torch.load(path, map_location="cpu", weights_only=True)
