"""Triton kernels of biasfast, installed as `biasfast.kernels` and exposed as `torch.library.triton_op`s.

They are registered when triton imports and either a CUDA device is present or the Triton
interpreter is on (`TRITON_INTERPRET=1`, which runs them on CPU tensors; the test suite uses
it so every kernel is exercised without a GPU). Each registered op name goes in TRITON_OPS.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_OPS: list[str] = ["snr_loss_triton"]


def interpreted() -> bool:
    """True when Triton runs in interpreter mode (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled() -> bool:
    """True when Triton kernels can run here: triton importable, and CUDA present or interpreted."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreted() or torch.cuda.is_available()


if enabled():
    from biasfast.kernels import snr_loss  # noqa: F401,E402  (registers biasfast::snr_loss_triton)
    from . import sampler_step  # noqa: F401,E402  (registers biasfast::sampler_step[_out]_triton)

    TRITON_OPS.extend(["sampler_step_triton", "sampler_step_out_triton"])
