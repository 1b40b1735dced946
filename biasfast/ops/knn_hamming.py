"""`biasfast::knn_hamming`: exact k nearest integer token rows under the Hamming distance (number of differing
positions), the search behind the hierarchical model's nearest-neighbour measures."""

from __future__ import annotations

import torch

from biasfast._core import dispatch


def knn_hamming_rows(query: torch.Tensor, ref: torch.Tensor, k: int, index_offset: int = 0,
                     exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on two 2-D integer row tensors already checked by the caller: (distances float32, indices)."""
    operator = dispatch.op("knn_hamming")
    dispatch.require_kernel("knn_hamming", query, "query")
    return operator(query, ref, k, index_offset, exclude_self)


def _fake(query, ref, k, index_offset, exclude_self):
    torch._check(query.dim() == 2 and ref.dim() == 2, lambda: "knn_hamming: query and ref must be 2-D")
    torch._check(query.shape[1] == ref.shape[1], lambda: "knn_hamming: sequence lengths of query and ref differ")
    rows = query.shape[0]
    return query.new_empty((rows, k), dtype=torch.float32), query.new_empty((rows, k), dtype=torch.int64)


def register() -> None:
    torch.library.register_fake("biasfast::knn_hamming")(_fake)
