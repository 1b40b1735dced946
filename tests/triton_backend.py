"""The Triton backend of an op, run where Triton can run: on CUDA tensors when a GPU is present (the compiled
kernel), on CPU tensors under the interpreter otherwise (tests/conftest.py sets TRITON_INTERPRET=1 then).

Tests build CPU tensors; `triton_kernel` moves them to the Triton device, runs the launcher of
biasfast/kernels/<op>.py and brings every result back (arguments it wrote into, too), so one test body checks
every backend on every machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

import pytest
import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _to(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def triton_kernel(module: str, function: str) -> Callable:
    """biasfast.kernels.<module>.<function>, called on the Triton device with results moved back to the CPU."""
    launcher = getattr(importlib.import_module(f"biasfast.kernels.{module}"), function)

    def run(*args: Any) -> Any:
        moved = [_to(a, TRITON_DEVICE) for a in args]
        result = launcher(*moved)
        for original, copy in zip(args, moved):
            if isinstance(original, torch.Tensor) and copy is not original:
                original.copy_(copy)  # out-variants write into their arguments
        return _to(result, "cpu")

    return run


def raises_async_check(match: str, module: str, function: str, *args: Any) -> None:
    """Call biasfast.kernels.<module>.<function> expecting its `torch._assert_async` value check to fire.

    On CPU tensors (the interpreter) the check raises at once with its message. On a GPU it is a device-side
    assert: the message is not carried to Python and the CUDA context is unusable afterwards, so the call runs in
    a child process, which must die of the device assert, and this process's context stays clean.
    """
    if TRITON_DEVICE == "cpu":
        with pytest.raises(RuntimeError, match=match):
            triton_kernel(module, function)(*args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "args.pt")
        torch.save(list(args), path)
        script = ("import importlib, sys, torch\n"
                  "args = [a.cuda() if isinstance(a, torch.Tensor) else a\n"
                  "        for a in torch.load(sys.argv[1], weights_only=True)]\n"
                  f"getattr(importlib.import_module('biasfast.kernels.{module}'), '{function}')(*args)\n"
                  "torch.cuda.synchronize()\n")
        result = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, f"the device check did not fire ({match!r})"
    assert "device-side assert" in result.stderr, result.stderr[-3000:]
