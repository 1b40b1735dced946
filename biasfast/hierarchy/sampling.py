"""Vectorised ancestral sampling of the (k-filtered) hierarchical model, exact inverse-CDF draws in float64."""

from __future__ import annotations

import torch


def _draw(probabilities: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probabilities` (..., n), never an index of probability 0."""
    cdf = probabilities.cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=cdf.dtype, generator=generator) * total
    index = (cdf <= u).sum(-1)
    # u·total can round up to total: clamp to the last index with non-zero probability.
    positions = torch.arange(probabilities.shape[-1]).expand_as(probabilities)
    last = torch.where(probabilities > 0, positions, -1).amax(-1)
    return torch.minimum(index, last)


def sample_leaves(
    grammar: torch.Tensor, depth: int, n: int, k: int, path: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(n, 2^depth) leaf tokens: uniform root, the 2^k depth-k nodes independently given the root, then M below."""
    q = grammar.shape[0]
    root = torch.randint(q, (n,), generator=generator)
    nodes = _draw(path[:, root].transpose(0, 1), generator) if k > 0 else root[:, None]
    productions = grammar.reshape(q, q * q)
    for _ in range(k, depth):
        pair = _draw(productions[nodes], generator)
        nodes = torch.stack([pair // q, pair % q], dim=-1).reshape(n, 2 * nodes.shape[1])
    return nodes
