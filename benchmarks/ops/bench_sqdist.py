"""Exact squared-L2 distance matrix: biasfast (direct differences) vs the reference (eager and compiled)."""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from benchmarks.conftest import shapes

SHAPES = shapes(full=[(256, 1024, 64), (256, 512, 784)], quick=[(17, 33, 9)])
PROVIDERS = ["biasfast", "reference", "compiled"]


def _reference_chunked(x, y, chunk=32):
    # Bounded memory: the broadcasted reference at full size would need n*m*d floats.
    return torch.cat([reference.sqdist(x[i : i + chunk], y) for i in range(0, x.shape[0], chunk)])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_sqdist(bench, benchmark, provider, n, m, d):
    benchmark.group = f"sqdist {n}x{m}x{d}"
    x, y = torch.randn(n, d), torch.randn(m, d)
    fn = {
        "biasfast": lambda: biasfast.sqdist(x, y),
        "reference": lambda: _reference_chunked(x, y),
        "compiled": torch.compile(lambda: _reference_chunked(x, y)),
    }[provider]
    bench(fn, provider=provider, shape=f"{n}x{m}x{d}")
