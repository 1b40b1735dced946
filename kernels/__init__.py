"""Triton kernels of biasfast, installed as `biasfast.kernels` and exposed as `torch.library.triton_op`s.

They are registered when triton imports and either a CUDA device is present or the Triton
interpreter is on (`TRITON_INTERPRET=1`, which runs them on CPU tensors; the test suite uses
it so every kernel is exercised without a GPU). Each registered op name goes in TRITON_OPS.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch.library import custom_op, triton_op

TRITON_OPS: list[str] = []


def interpreted() -> bool:
    """True when Triton runs in interpreter mode (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled() -> bool:
    """True when Triton kernels can run here: triton importable, and CUDA present or interpreted."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreted() or torch.cuda.is_available()


def register_op(name: str, fn, mutates_args: tuple[str, ...] = ()):
    """A triton_op (visible to torch.compile, which can fuse around it); under the interpreter an opaque
    custom_op instead, because AOT tracing would decompose the op and drop the interpreted kernel launch.
    `fn` is its own fake: it must skip the launch for fake tensors when interpreted."""
    if not interpreted():
        return triton_op(name, mutates_args=mutates_args)(fn)
    op = custom_op(name, fn, mutates_args=mutates_args)
    op.register_fake(fn)
    return op


if enabled():
    from biasfast.kernels import sampler_step, snr_loss, tree_bp  # noqa: F401,E402  (register the triton_ops)

    TRITON_OPS += ["snr_loss_triton", "sampler_step_triton", "sampler_step_out_triton", "tree_bp_triton"]
