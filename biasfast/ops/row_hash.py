"""`biasfast::row_hash`: find rows shared by two data sets in one pass over each, without comparing every pair."""

from __future__ import annotations

import torch

from biasfast._core import dispatch
from biasfast._core.checks import check_tensor


def row_hash(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash (int64) of each row of a 2-D tensor of any dtype; equal rows hash equally (-0.0 == 0.0).

    Distinct rows collide with probability about 2^-64 per pair.
    """
    check_tensor(rows, "rows")
    if rows.dim() != 2:
        raise ValueError(f"rows: expected a 2-D (rows, features) tensor, got shape {tuple(rows.shape)}")
    operator = dispatch.op("row_hash")
    dispatch.require_kernel("row_hash", rows, "rows")
    return operator(rows)


def _fake(rows: torch.Tensor) -> torch.Tensor:
    torch._check(rows.dim() == 2, lambda: "row_hash: rows must be 2-D")
    return rows.new_empty((rows.shape[0],), dtype=torch.int64)


def register() -> None:
    # An integer hash has no gradient; no autograd formula is registered.
    torch.library.register_fake("biasfast::row_hash")(_fake)
