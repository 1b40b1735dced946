"""The fixed mmap threshold: a large block freed must go back to the system instead of raising the threshold and
leaving the next ones on the heap (what made the audit's private memory grow with the training-set size)."""

import platform
import subprocess
import sys

import pytest

from biasfast._core.memory import fix_mmap_threshold

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Free one 24 MiB block (glibc then raises its threshold to 24 MiB), then make 40 blocks of 4 MiB each followed by a
# small long-lived one, and free the big ones: from the heap they stay resident behind the small ones, mapped they
# are returned. Prints the anonymous memory held afterwards, in MiB.
CHILD = """
import sys, numpy as np
from biasfast._core.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def anonymous():
    with open("/proc/self/smaps_rollup") as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith("Anonymous:")) / 1024
before = anonymous()
big = np.empty(24 << 20, np.uint8); big[:] = 1; del big
kept, blocks = [], []
for _ in range(40):
    block = np.empty(4 << 20, np.uint8); block[:] = 1  # malloc and touch (np.ones would calloc)
    blocks.append(block)
    kept.append(np.empty(4096, np.uint8))
del blocks
print(anonymous() - before)
"""


def _held_mib(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_fixed_threshold_returns_freed_large_blocks():
    assert fix_mmap_threshold()
    assert _held_mib("fixed") < 40  # 160 MiB were allocated and freed
    assert _held_mib("default") > 100  # the effect is real: without the fix the heap keeps them
