"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

import torch


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by direct differences, (n, d) x (m, d) -> (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


# ---- SNR-weighted loss (issue 5) ----


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over non-batch dims of (pred − target)², in float32 (float64 for float64 inputs), as diffusers does."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


def snr_weighted_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """reduce_b( weights[timesteps[b]] · mean_i (pred_bi − target_bi)² ), reduction "mean", "sum" or "none"."""
    mse = per_sample_mse(pred, target)
    weighted = weights.to(mse.dtype)[timesteps] * mse
    if reduction == "none":
        return weighted
    return weighted.sum() if reduction == "sum" else weighted.mean()
