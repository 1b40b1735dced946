"""Loads the compiled extension once and remembers why it failed, so ops can say how to fix it."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

REBUILD_HINT = "rebuild it against the installed torch with `pip install --no-build-isolation -e .` in the biasfast checkout"

try:
    from biasfast import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    LOAD_ERROR: str | None = None
    BUILD_INFO: dict[str, Any] = json.loads(_C.build_info())
except ImportError as error:  # missing, or built for another torch (undefined symbols)
    _C = None
    LOAD_ERROR = str(error)
    BUILD_INFO = {}

# A BIASFAST_CPU_ISA value the CPU or the build cannot honour raises a ValueError naming the variable here, at
# import, rather than at the first op call of a run. The variable is read again at every op call.
if _C is not None:
    _C.cpu_isa()


def cpu_isa() -> str | None:
    """The CPU kernel variant BIASFAST_CPU_ISA selects now, "avx2" or "generic" (None without the extension)."""
    return _C.cpu_isa() if _C is not None else None


def cpu_variants_ran() -> dict[str, str]:
    """Each op's CPU kernel variant on its last call in this process ({} before any call)."""
    return dict(_C.cpu_variants_ran()) if _C is not None else {}


def take_avx2_bodies_ran() -> list[str]:
    """The CPU kernels' AVX2 bodies that ran since the last call ("knn/fused", "snr_loss", ...), clearing them: what
    tells the code that ran from the variant label an op writes at its entry."""
    return list(_C.take_avx2_bodies_ran()) if _C is not None else []


if _C is not None and BUILD_INFO.get("torch_version") != torch.__version__:
    LOAD_ERROR = (
        f"biasfast._C was built for torch {BUILD_INFO.get('torch_version')} but torch {torch.__version__} is installed"
    )


def available() -> bool:
    """True when the compiled operators are loaded and match the running torch."""
    return LOAD_ERROR is None


def require() -> None:
    """Raise a RuntimeError naming the fix when the compiled operators cannot be used."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"biasfast's compiled extension is unusable ({LOAD_ERROR}); {REBUILD_HINT}.")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `biasfast::op` has a kernel registered for `dispatch_key` (e.g. "CPU", "CUDA")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"biasfast::{op}", dispatch_key)
    except RuntimeError:
        return False


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation and output dtype: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32
