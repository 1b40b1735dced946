"""Argument checks shared by the public API: each error names the argument and the problem."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_finite(t: torch.Tensor, name: str) -> None:
    """Reject NaN/Inf, naming the first bad row (row = index along dim 0)."""
    if t.numel() and bool(torch.isfinite(t.sum())):  # a finite sum has no NaN/Inf term: one cheap pass
        return
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = bad.reshape(t.shape[0], -1).any(dim=1) if t.dim() > 0 else bad.reshape(1)
        first = int(rows.nonzero()[0, 0])
        raise ValueError(f"{name}: contains NaN or Inf (first bad row {first})")


def check_same_device(tensors: dict[str, torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_device(value: str | torch.device, name: str) -> torch.device:
    """A torch.device that exists here: a clear error for a typo or for CUDA on a machine without it."""
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{name}: {value!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {value!r} requested but CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected cpu or cuda, got {value!r}")
    return device


def as_rows(value: object, name: str, *, allow_empty: bool = False) -> torch.Tensor:
    """A tensor or numpy array (memmaps stay mapped, never copied) as a 2-D (rows, features) view: dim 0 indexes
    rows, the other dimensions (an image's C, H, W) are flattened into features."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise TypeError(f"{name}: unsupported numpy dtype {value.dtype}")
        with warnings.catch_warnings():  # read-only arrays (memmaps) are only ever read
            warnings.simplefilter("ignore", UserWarning)
            value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.dim() < 2:
        raise ValueError(f"{name}: expected (rows, features...) with at least 2 dimensions, got shape {tuple(value.shape)}")
    rows = value.reshape(value.shape[0], math.prod(value.shape[1:]))
    if not allow_empty and (rows.shape[0] == 0 or rows.shape[1] == 0):
        raise ValueError(f"{name}: is empty (shape {tuple(value.shape)})")
    return rows
