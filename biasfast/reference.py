"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

import torch


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by direct differences, (n, d) x (m, d) -> (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
