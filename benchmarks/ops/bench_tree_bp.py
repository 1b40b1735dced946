"""Exact BP denoiser of the hierarchical model: biasfast (fused C++ tree_bp) vs the einsum reference (eager, compiled).

Throughput = batch / time; the issue's target is ≥ 2,000,000 sequences/s at q = 6, depth = 4, batch 16,384, float32.
On a GPU also `triton` (the public API on CUDA tensors: the Triton kernel tree_bp_triton) and `reference_cuda` (the
einsum reference on the GPU), skipped without CUDA.
"""

import pytest
import torch

from benchmarks.conftest import shapes
from biasfast.ops import reference
from biasfast.hierarchy import FilteredHierarchicalModel

SHAPES = shapes(full=[(6, 4, 16384, 0), (6, 4, 16384, 2)], quick=[(6, 4, 33, 0)])  # (q, depth, batch, k)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_PROVIDERS = [pytest.param(p, marks=needs_cuda) for p in ("triton", "reference_cuda")]
PROVIDERS = ["biasfast", "reference", "compiled", *GPU_PROVIDERS]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("q,depth,batch,k", SHAPES)
def test_exact_denoiser(bench, benchmark, provider, q, depth, batch, k):
    benchmark.group = f"tree_bp q={q} depth={depth} batch={batch} k={k} float32"
    model = FilteredHierarchicalModel(q=q, depth=depth)
    alpha_bar = 0.5
    x0 = torch.nn.functional.one_hot(model.sample(batch), q).float()
    x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * torch.randn(x0.shape)
    scale = torch.full((batch,), alpha_bar**0.5 / (1 - alpha_bar))
    grammar, top = model.grammar.float(), model.path_matrices(k).float()
    if provider.endswith(("triton", "cuda")):
        x_t, scale, grammar, top = (t.cuda() for t in (x_t, scale, grammar, top))
    fn = {
        "biasfast": lambda: model.filtered_denoiser(x_t, alpha_bar, k),
        "triton": lambda: model.filtered_denoiser(x_t, alpha_bar, k),
        "reference": lambda: reference.tree_bp(x_t, scale, grammar, top)[0],
        "reference_cuda": lambda: reference.tree_bp(x_t, scale, grammar, top)[0],
        "compiled": torch.compile(lambda: reference.tree_bp(x_t, scale, grammar, top)[0]),
    }[provider]
    benchmark.extra_info["sequences"] = batch
    rounds = 3 if provider in ("reference", "compiled") else 10
    bench(fn, provider=provider, shape=f"q{q} L{2**depth} B{batch} k{k}", rounds=rounds)
