"""What was built and what runs where: `biasfast.info()` and `python -m biasfast info`."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from biasfast._core import dispatch, extension


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (for the machine line of measurement reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def collect() -> dict:
    """Everything `info()` prints, as a dict (recorded by the benchmark harness too)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "biasfast": _version("biasfast"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "extension_loaded": extension.available(),
        "extension_error": extension.LOAD_ERROR,
        "build": extension.BUILD_INFO,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": extension.cpu_isa(),
        "cpu_isa_forced": os.environ.get("BIASFAST_CPU_ISA") or None,
        "cpu_variants_ran": extension.cpu_variants_ran(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "triton_kernels": dispatch.triton_available(),
        "ops": dispatch.implementations(),
    }


def info() -> str:
    """A readable report of the build; also printed by `python -m biasfast info`."""
    c = collect()
    build = c["build"]
    lines = [
        f"biasfast {c['biasfast']}  torch {c['torch']}  triton {c['triton']}  python {c['python']}",
        f"compiled extension (_C): {'loaded' if c['extension_loaded'] else 'UNUSABLE: ' + str(c['extension_error'])}",
    ]
    if build:
        lines.append(
            f"  built for torch {build['torch_version']}, OpenMP {build['openmp']}, CUDA kernels {build['cuda']}, "
            f"compiled ISA {build['compiled_isa']}, compiler {build['compiler']}"
        )
    lines += [
        f"CPU: {c['cpu']} ({c['cores']} cores, ATen capability {c['cpu_capability']}, {c['torch_threads']} threads)",
        f"CPU kernels: {c['cpu_isa'] or 'not loaded'} variant "
        f"({'BIASFAST_CPU_ISA=' + c['cpu_isa_forced'] if c['cpu_isa_forced'] else 'chosen by the CPU; BIASFAST_CPU_ISA unset'})",
        f"GPU: {c['gpu'] or 'none'}   Triton kernels: {'registered' if c['triton_kernels'] else 'not registered'}",
        "ops (implementation on cpu, with the variant its last call here ran / cuda):",
    ]
    ran = c["cpu_variants_ran"]
    lines += [f"  {name:<28} {impl['cpu'] + (f' ({ran[name]})' if name in ran else ''):<22} {impl['cuda']}"
              for name, impl in c["ops"].items()]
    if not c["ops"]:
        lines.append("  (none registered)")
    return "\n".join(lines)
