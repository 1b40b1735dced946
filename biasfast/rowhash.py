"""Row hashes: find rows shared by two data sets in one pass over each, without comparing every pair."""

from __future__ import annotations

import torch

from biasfast import _extension
from biasfast._validation import check_tensor


def row_hash(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash (int64) of each row of a 2-D tensor of any dtype; equal rows hash equally (-0.0 == 0.0).

    Distinct rows collide with probability about 2^-64 per pair.
    """
    check_tensor(rows, "rows")
    if rows.dim() != 2:
        raise ValueError(f"rows: expected a 2-D (rows, features) tensor, got shape {tuple(rows.shape)}")
    _extension.require()
    return torch.ops.biasfast.row_hash(rows)
