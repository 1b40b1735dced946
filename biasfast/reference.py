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

# ---- memorization metrics (issue: bias_score) ----

_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    import numpy as np

    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_hash(rows: torch.Tensor) -> torch.Tensor:
    """The 64-bit row hash of `biasfast::row_hash` in NumPy uint64 (wrap-around) arithmetic, element by element."""
    import numpy as np

    rows = rows.detach().cpu()
    if rows.is_floating_point():
        rows = torch.where(rows == 0, torch.zeros_like(rows), rows)  # -0.0 hashes as 0.0
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    size = rows.element_size()
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    bits = rows.contiguous().view(signed).numpy().view(unsigned).astype(np.uint64)
    n, d = bits.shape
    with np.errstate(over="ignore"):
        positions = (np.arange(1, d + 1, dtype=np.uint64) * np.uint64(_GOLDEN)).astype(np.uint64)
        sums = _mix64(bits + positions).sum(axis=1, dtype=np.uint64)
        hashes = _mix64(sums ^ np.uint64(d))
    return torch.from_numpy(hashes.view(np.int64).copy())
