"""The whole distance matrix under any kNN metric, on the sqdist op (exact: direct differences, no norm expansion)."""

from __future__ import annotations

import numpy as np
import torch

from biasfast._core import extension
from biasfast._core.checks import ArrayLike, check_finite
from biasfast.neighbors.knn import check_metric, check_pair, metric_rows
from biasfast.ops.sqdist import sqdist


def _unit_rows(x: torch.Tensor, center: bool, name: str) -> torch.Tensor:
    """Rows centred (pearson) and scaled to unit norm in float64; undefined rows are an error, not a NaN."""
    x = x.double()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    zero = (norm == 0).flatten().nonzero()
    if zero.numel():
        what = "is constant: its pearson distance is undefined" if center else "has zero norm: its cosine distance is undefined"
        raise ValueError(f"{name}: row {int(zero[0])} {what}")
    return x / norm


def pairwise_distances(x: ArrayLike, y: ArrayLike, metric: str = "l2") -> torch.Tensor:
    """Full (n, m) distance matrix between the rows of x and y, exact (direct differences); for small inputs.

    Same inputs, metrics and dtypes as `biasfast.knn`; use `knn` when only the nearest rows are needed.
    """
    metric = check_metric(metric)
    xr, yr = metric_rows(x, "x", metric), metric_rows(y, "y", metric)
    if yr.shape[1] != xr.shape[1]:
        raise ValueError(f"y: feature size {yr.shape[1]} does not match x's {xr.shape[1]}")
    check_pair(xr, yr)
    if metric == "hamming":
        return torch.cat([(xr[i : i + 64, None, :] != yr[None]).sum(-1) for i in range(0, xr.shape[0], 64)]).float()
    out = torch.float64 if torch.float64 in (xr.dtype, yr.dtype) else torch.float32
    check_finite(xr, "x")
    check_finite(yr, "y")
    extension.require()
    if metric in ("cosine", "pearson"):
        center = metric == "pearson"
        return (sqdist(_unit_rows(xr, center, "x"), _unit_rows(yr, center, "y")) / 2).to(out)
    d2 = sqdist(xr.to(out), yr.to(out))
    return d2.sqrt() if metric == "l2" else d2
