"""Pairwise distances on the compiled kernels (exact: direct differences, no norm expansion)."""

from __future__ import annotations

import torch

from biasfast import _extension
from biasfast._validation import check_floating, check_same_device, check_tensor


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
