"""Row hashes (`biasfast::row_hash`): biasfast vs the reference (the same splitmix fold, vectorised in NumPy uint64
arithmetic: torch has no wrapping uint64 multiply, so there is no torch.compile provider), on training-set-sized
inputs: 50,000 images of 3×32×32 (float32) and 200,000 token rows (int64)."""

import pytest
import torch

import biasfast
from benchmarks.conftest import shapes
from biasfast.ops import reference

SHAPES = shapes(full=[(50000, 3072, torch.float32), (200000, 16, torch.int64)], quick=[(37, 11, torch.float32)])
PROVIDERS = ["biasfast", "reference"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,d,dtype", SHAPES)
def test_row_hash(bench, benchmark, provider, n, d, dtype):
    label = f"{n}x{d} {str(dtype).removeprefix('torch.')}"
    benchmark.group = f"row_hash {label}"
    rows = torch.randn(n, d).to(dtype) if dtype.is_floating_point else torch.randint(0, 6, (n, d), dtype=dtype)
    fn = {
        "biasfast": lambda: biasfast.row_hash(rows),
        "reference": lambda: reference.row_hash(rows),
    }[provider]
    bench(fn, provider=provider, shape=label, rounds=5, warmup=1)
