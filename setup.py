"""Build biasfast._C: C++ CPU kernels always, CUDA kernels when a toolkit is usable.

Knobs (environment variables):
  BIASFAST_FORCE_CUDA=1   build csrc/cuda/*.cu even if torch reports no CUDA build (needs nvcc)
  BIASFAST_NO_CUDA=1      never build CUDA kernels
  BIASFAST_NATIVE=1       compile CPU kernels with -march=native (not portable)
  BIASFAST_DEBUG=1        -O0 -g
  TORCH_CUDA_ARCH_LIST    CUDA architectures, honoured by torch's BuildExtension
  NVCC_FLAGS              extra nvcc flags (shell-quoted)
"""

import glob
import os
import shlex

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if env_flag("BIASFAST_NO_CUDA"):
        return False
    if env_flag("BIASFAST_FORCE_CUDA"):
        return True
    # A CUDA-enabled torch plus a toolkit is enough: wheels are often built on machines without a GPU.
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    debug = env_flag("BIASFAST_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fopenmp", "-DBIASFAST_TORCH_VERSION=\"" + torch.__version__ + "\""]
    if env_flag("BIASFAST_NATIVE"):
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/**/*.cpp", recursive=True))
    kwargs = dict(
        name="biasfast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if want_cuda():
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
        nvcc += ["-std=c++20", "-DBIASFAST_WITH_CUDA"] + shlex.split(os.environ.get("NVCC_FLAGS", ""))
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DBIASFAST_WITH_CUDA"], "nvcc": nvcc}
        return CUDAExtension(**kwargs)
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return CppExtension(**kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
