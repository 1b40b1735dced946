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

from torch.utils.cpp_extension import include_paths


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cuda-check: nvcc not found, skipped")
        return 0
    sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not os.path.isdir(os.path.join(cuda_home, "include")):
        cuda_home = "/usr/local/cuda"
    includes = [f"-I{p}" for p in include_paths() + [os.path.join(cuda_home, "include"), "csrc",
                                                     sysconfig.get_paths()["include"]]]
    arch = os.environ.get("BIASFAST_CUDA_CHECK_ARCH", "sm_90")
    failed = []
    with tempfile.TemporaryDirectory() as out:
        shim = os.path.join(out, "include", "c10", "cuda", "impl")
        os.makedirs(shim)
        with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{os.path.join(out, 'include')}")
        for source in sources:
            cmd = [nvcc, "-c", source, "-o", os.path.join(out, os.path.basename(source) + ".o"), "-std=c++20",
                   f"-arch={arch}", "-O3", "-DBIASFAST_WITH_CUDA", "-D_GLIBCXX_USE_CXX11_ABI=1",
                   "-DTORCH_EXTENSION_NAME=_C", "--expt-relaxed-constexpr", *includes]
            print("cuda-check:", source, flush=True)
            if subprocess.run(cmd).returncode != 0:
                failed.append(source)
    if failed:
        print("cuda-check: FAILED:", " ".join(failed))
        return 1
    print(f"cuda-check: {len(sources)} file(s) compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
