"""Exact Hamming kNN (`biasfast::knn_hamming`) on token sequences, the nearest-neighbour search of the hierarchical
model's measures: biasfast vs a chunked plain-PyTorch (query != ref).sum + topk, and its torch.compile."""

import pytest
import torch

import biasfast
from benchmarks.conftest import shapes

SHAPES = shapes(full=[(2000, 20000, 16, 6), (1000, 10000, 256, 4)], quick=[(13, 77, 9, 3)])
PROVIDERS = ["biasfast", "reference", "compiled"]


def hamming_topk(query: torch.Tensor, ref: torch.Tensor, k: int, chunk: int = 64):
    """The plain-PyTorch baseline, in query chunks so the (chunk, nr, L) comparison stays bounded."""
    parts = [(query[i : i + chunk, None, :] != ref[None]).sum(-1).topk(k, dim=1, largest=False)
             for i in range(0, len(query), chunk)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nq,nr,length,vocab", SHAPES)
def test_knn_hamming(bench, benchmark, provider, nq, nr, length, vocab):
    label = f"{nq}x{nr}x{length} q={vocab}"
    benchmark.group = f"knn_hamming {label} k=1"
    gen = torch.Generator().manual_seed(0)
    query = torch.randint(0, vocab, (nq, length), generator=gen)
    ref = torch.randint(0, vocab, (nr, length), generator=gen)
    fn = {
        "biasfast": lambda: biasfast.knn(query, ref, k=1, metric="hamming"),
        "reference": lambda: hamming_topk(query, ref, 1),
        "compiled": (lambda f: lambda: f(query, ref, 1))(torch.compile(hamming_topk)),
    }[provider]
    bench(fn, provider=provider, shape=label, rounds=3, warmup=1)
