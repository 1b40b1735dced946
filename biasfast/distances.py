"""Pairwise distances on the compiled kernels (exact: direct differences, no norm expansion)."""

from __future__ import annotations

import numpy as np
import torch

from biasfast import _extension
from biasfast._validation import check_finite, check_floating, check_same_device, check_tensor

ArrayLike = torch.Tensor | np.ndarray


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 distances between the rows of x (n, d) and y (m, d).

    Returns float32 (float64 for float64 inputs); differentiable in x and y.
    """
    check_tensor(x, "x")
    check_tensor(y, "y")
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (rows, features) tensor, got shape {tuple(t.shape)}")
        check_floating(t, name)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y: feature size {y.shape[1]} does not match x's {x.shape[1]}")
    check_same_device({"x": x, "y": y})
    _extension.require()
    return torch.ops.biasfast.sqdist(x, y)


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
    from biasfast.knn import as_rows, check_metric, check_pair

    metric = check_metric(metric)
    xr, yr = as_rows(x, "x", metric), as_rows(y, "y", metric)
    if yr.shape[1] != xr.shape[1]:
        raise ValueError(f"y: feature size {yr.shape[1]} does not match x's {xr.shape[1]}")
    check_pair(xr, yr)
    if metric == "hamming":
        return torch.cat([(xr[i : i + 64, None, :] != yr[None]).sum(-1) for i in range(0, xr.shape[0], 64)]).float()
    out = torch.float64 if torch.float64 in (xr.dtype, yr.dtype) else torch.float32
    check_finite(xr, "x")
    check_finite(yr, "y")
    _extension.require()
    if metric in ("cosine", "pearson"):
        center = metric == "pearson"
        return (torch.ops.biasfast.sqdist(_unit_rows(xr, center, "x"), _unit_rows(yr, center, "y")) / 2).to(out)
    d2 = torch.ops.biasfast.sqdist(xr.to(out), yr.to(out))
    return d2.sqrt() if metric == "l2" else d2
