"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

import torch


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by direct differences, (n, d) x (m, d) -> (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


# ---- exact k-nearest neighbours (issue 3) ----


def _unit_rows(x: torch.Tensor, center: bool) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True) if center else x
    return x / x.norm(dim=1, keepdim=True)


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Full distance matrix by direct differences in the inputs' dtype (pass float64 for the oracle).

    cosine and pearson use 1 − cos = ‖û − v̂‖² / 2, which keeps its precision for near-duplicates.
    """
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if metric == "hamming":
        return (x[:, None, :] != y[None, :, :]).sum(-1).float()
    if metric in ("cosine", "pearson"):
        return sqdist(_unit_rows(x, metric == "pearson"), _unit_rows(y, metric == "pearson")) / 2
    d2 = sqdist(x, y)
    return d2.sqrt() if metric == "l2" else d2


def knn(
    query: torch.Tensor, ref: torch.Tensor, k: int = 1, metric: str = "l2", exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force k nearest neighbours, ties broken by the lower index; `exclude_self` drops index i for query i."""
    dist = pairwise_distances(query, ref, metric)
    if exclude_self:
        dist = dist.clone()
        dist[torch.arange(dist.shape[0]), torch.arange(dist.shape[0])] = float("inf")
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]  # stable: equal distances keep index order
    return dist.gather(1, order), order
