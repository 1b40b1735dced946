"""`biasfast::knn`: exact k nearest reference rows under the float metrics (l2, sqeuclidean, cosine, pearson).

Candidates come from tiled inner products and are re-ranked with exact differences and certified (see
csrc/cpu/knn/knn.cpp), so results equal a float64 brute force up to ties, which go to the lower index.
`biasfast.knn` (biasfast/neighbors/knn.py) builds on this with any input type, streaming and merging.
"""

from __future__ import annotations

import torch

from biasfast._core import dispatch


def knn_rows(query: torch.Tensor, ref: torch.Tensor, k: int, metric: str, index_offset: int = 0,
             exclude_self: bool = False, workspace_mb: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on two 2-D row tensors already checked by the caller: (distances (nq, k), indices (nq, k))."""
    operator = dispatch.op("knn")
    dispatch.require_kernel("knn", query, "query")
    return operator(query, ref, k, metric, index_offset, exclude_self, workspace_mb)


def _fake(query, ref, k, metric, index_offset, exclude_self, workspace_mb):
    torch._check(query.dim() == 2 and ref.dim() == 2, lambda: "knn: query and ref must be 2-D")
    torch._check(query.shape[1] == ref.shape[1], lambda: "knn: feature sizes of query and ref differ")
    dtype = torch.float64 if torch.float64 in (query.dtype, ref.dtype) else torch.float32
    return query.new_empty((query.shape[0], k), dtype=dtype), query.new_empty((query.shape[0], k), dtype=torch.int64)


def register() -> None:
    # Indices have no gradient and distances are a selection: no autograd formula.
    torch.library.register_fake("biasfast::knn")(_fake)
