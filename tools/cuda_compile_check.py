"""Compile every csrc/cuda/*.cu with nvcc against the installed torch headers (a check: nothing is linked or run).

Used by CI on machines with nvcc but no GPU, so CUDA code cannot rot unnoticed. A CPU build of torch ships
c10/cuda headers but not their generated config header, nor cuBLAS/cuSPARSE headers: the check supplies the
former, and kernels include c10/cuda (streams, guards, launch checks) rather than ATen/cuda/CUDAContext.h.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

from torch.utils.cpp_extension import include_paths


def cuda_home(nvcc: str) -> str:
    home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home if os.path.isdir(os.path.join(home, "include")) else "/usr/local/cuda"


def write_config_shim(root: str) -> str:
    shim = os.path.join(root, "include", "c10", "cuda", "impl")
    os.makedirs(shim)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return os.path.join(root, "include")


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cuda-check: nvcc not found, skipped")
        return 0
    sources = sorted(glob.glob("csrc/cuda/*.cu"))
    arch = os.environ.get("BIASFAST_CUDA_CHECK_ARCH", "sm_90")
    with tempfile.TemporaryDirectory() as out:
        dirs = include_paths() + [os.path.join(cuda_home(nvcc), "include"), "csrc", sysconfig.get_paths()["include"],
                                  write_config_shim(out)]
        flags = ["-std=c++20", f"-arch={arch}", "-O3", "-DBIASFAST_WITH_CUDA", "-D_GLIBCXX_USE_CXX11_ABI=1",
                 "-DTORCH_EXTENSION_NAME=_C", "--expt-relaxed-constexpr", "-w", *[f"-I{d}" for d in dirs]]

        def compile_one(source: str) -> tuple[str, subprocess.CompletedProcess]:
            obj = os.path.join(out, os.path.basename(source) + ".o")
            return source, subprocess.run([nvcc, "-c", source, "-o", obj, *flags], capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_one, sources))
    failed = []
    for source, result in results:
        print(f"cuda-check: {source}: {'ok' if result.returncode == 0 else 'FAILED'}")
        if result.returncode != 0:
            print(result.stdout + result.stderr)
            failed.append(source)
    print(f"cuda-check: {len(sources) - len(failed)}/{len(sources)} file(s) compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
