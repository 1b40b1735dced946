"""What this CPU can run, read from /proc/cpuinfo (not from biasfast: the tests check biasfast's own choice)."""

import pytest


def cpu_has_avx2() -> bool:
    """Whether the CPU has AVX2, FMA and F16C: the level of the CPU kernels' AVX2 variant (csrc/common/isa.h)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


needs_avx2 = pytest.mark.skipif(not cpu_has_avx2(), reason="this CPU has no AVX2+FMA+F16C")
CPU_VARIANTS = ["generic", "avx2"] if cpu_has_avx2() else ["generic"]  # the BIASFAST_CPU_ISA values this CPU runs
