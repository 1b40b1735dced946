"""The one dispatch rule. Every op is called as `torch.ops.biasfast.<op>` and PyTorch's dispatcher picks the
kernel from the tensors' device:

- CPU tensors run the C++ kernel (csrc/cpu/<op>.cpp);
- CUDA tensors run the CUDA C++ kernel (csrc/cuda/<op>.cu) when the op has one, else the Triton kernel
  (kernels/<op>.py), which `register_triton` installs as the op's CUDA kernel (as torchvision registers its
  Triton nms as a backend of `torchvision::nms`).

No wrapper chooses a kernel in Python, and `implementations()` (what `biasfast.info()` prints) reads the
dispatcher and the Triton registrations, so it shows exactly what a call runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

from biasfast._core import extension

NAMESPACE = "biasfast"


@dataclass(frozen=True)
class TritonKernel:
    module: str  # e.g. "biasfast.kernels.snr_loss"
    function: str  # the launcher in that module
    registered: bool  # False where no CUDA device or no triton: CUDA tensors then have no kernel
    reason: str = ""


_TRITON: dict[str, TritonKernel] = {}  # "<op>" or "<op>.<overload>" -> its Triton CUDA kernel
_SERVED: set[tuple[str, str]] = set()  # (op, device) pairs known to have a kernel: skips the dispatcher query


def triton_available() -> bool:
    """Triton can launch compiled kernels here: triton imports and a CUDA device is present."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def register_triton(name: str, module: str, function: str) -> None:
    """Install `module.function` (a Triton launcher with the op's schema) as the CUDA kernel of `biasfast::name`;
    recorded either way, so `implementations()` can say why CUDA tensors have no kernel."""
    if not extension.available():
        return
    if not triton_available():
        reason = "triton is not installed" if importlib.util.find_spec("triton") is None else "no CUDA device"
        _TRITON[name] = TritonKernel(module, function, False, reason)
        return
    launcher = getattr(importlib.import_module(module), function)
    torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda")(launcher)
    _TRITON[name] = TritonKernel(module, function, True)


def op_names() -> list[str]:
    """The registered biasfast ops (packet names, without namespace or overload)."""
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith(f"{NAMESPACE}::")}
    return sorted(names)


def overload_names(op: str) -> list[str]:
    """`op` and `op.<overload>` for each of its overloads."""
    packet = getattr(torch.ops.biasfast, op)
    return [op if o == "default" else f"{op}.{o}" for o in packet.overloads()]


def implementation(name: str, device: str) -> str:
    """What runs `biasfast::name` (an op or op.overload) for tensors on `device` ("cpu" or "cuda")."""
    if device == "cuda" and name in _TRITON:
        triton = _TRITON[name]
        return "Triton" if triton.registered else f"Triton (not registered: {triton.reason})"
    if extension.has_kernel(name, device.upper()):
        return "C++" if device == "cpu" else "CUDA C++"
    return "-"


def implementations() -> dict[str, dict[str, str]]:
    """For every op and overload: the kernel that serves CPU and CUDA tensors."""
    return {name: {device: implementation(name, device) for device in ("cpu", "cuda")}
            for op in op_names() for name in overload_names(op)}


def op(name: str) -> torch._ops.OpOverloadPacket:
    """`torch.ops.biasfast.<name>`, after checking that the compiled extension is usable."""
    extension.require()
    return getattr(torch.ops.biasfast, name)


def require_kernel(name: str, tensor: torch.Tensor, argument: str) -> None:
    """A clear error where the build has no kernel for `tensor`'s device (instead of the dispatcher's). Skipped
    while torch.compile traces (the graph's fake kernels need no check, and the dispatcher is not traceable)."""
    if torch.compiler.is_compiling():
        return
    device = tensor.device.type
    if (name, device) in _SERVED:
        return
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{argument}: unsupported device {tensor.device}; expected cpu or cuda")
    if implementation(name, device) in ("C++", "CUDA C++", "Triton"):
        _SERVED.add((name, device))  # registrations only ever add kernels: the answer stays true
        return
    detail = implementation(name, device)
    why = detail[detail.find(":") + 2:-1] if detail.startswith("Triton") else "this build has no such kernel"
    raise RuntimeError(f"{argument}: biasfast::{name} has no kernel for {device} tensors ({why})")
