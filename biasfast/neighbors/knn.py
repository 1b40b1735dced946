"""Exact k-nearest neighbours: in memory, or streaming a reference set larger than memory in chunks.

Every result equals a float64 brute force up to genuine ties (ties go to the lower index): the float metrics run
the `biasfast::knn` op, hamming the `biasfast::knn_hamming` op (biasfast/ops/).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from biasfast._core import extension
from biasfast._core.checks import ArrayLike, as_rows
from biasfast._core.constants import FLOAT_DTYPES, METRICS
from biasfast.ops.knn import knn_rows
from biasfast.ops.knn_hamming import knn_hamming_rows


def metric_rows(value: object, name: str, metric: str, *, allow_empty: bool = False) -> torch.Tensor:
    """`as_rows`, with the dtype the metric's kernel reads: integer tokens for hamming, a float dtype otherwise."""
    rows = as_rows(value, name, allow_empty=allow_empty)
    if metric == "hamming":
        if rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"{name}: metric 'hamming' needs integer token tensors, got dtype {rows.dtype}")
    elif rows.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: metric '{metric}' needs float32/float16/bfloat16/float64, got dtype {rows.dtype}")
    return rows


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric: unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
    return metric  # type: ignore[return-value]


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    return int(k)


def check_pair(query: torch.Tensor, ref: torch.Tensor) -> None:
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"ref: feature size {ref.shape[1]} does not match query's {query.shape[1]}")
    if ref.device != query.device:
        raise ValueError(f"ref: is on {ref.device} but query is on {query.device}")


def search_chunk(
    query: torch.Tensor, ref: torch.Tensor, k: int, metric: str, offset: int, exclude_self: bool, workspace_mb: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of `query` within one reference chunk whose first row has global index `offset`.

    Rows with fewer than k eligible references are padded with (inf, -1).
    """
    check_pair(query, ref)
    if metric == "hamming":
        return knn_hamming_rows(query, ref, k, offset, exclude_self)
    return knn_rows(query, ref, k, metric, offset, exclude_self, workspace_mb)


def merge_topk(
    dist_a: torch.Tensor, index_a: torch.Tensor, dist_b: torch.Tensor, index_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of two candidate lists per row, ordered by (distance, index); padding (inf, -1) sorts last."""
    dist = torch.cat([dist_a, dist_b], dim=1)
    index = torch.cat([index_a, index_b], dim=1)
    key = torch.where(index < 0, torch.iinfo(torch.int64).max, index)
    order = torch.argsort(key, dim=1, stable=True)
    dist, index = dist.gather(1, order), index.gather(1, order)
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return dist.gather(1, order), index.gather(1, order)


def knn(
    query: ArrayLike,
    ref: ArrayLike | Iterable[ArrayLike],
    k: int = 1,
    metric: str = "l2",
    *,
    exclude_self: bool = False,
    workspace_mb: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest reference rows of every query row: (distances (nq, k) ascending, indices (nq, k) int64).

    `query` and `ref` are tensors or numpy arrays (memmaps included) of any shape (rows, ...), flattened per row;
    `ref` may also be an iterable of such chunks (indices are global across chunks). Distances are float32
    (float64 when an input is float64). `exclude_self=True` (query and ref are the same set) drops each query's
    own row by index, so exact duplicates stay visible. Extra memory: `workspace_mb` plus O(nq·(k + d)).
    """
    metric = check_metric(metric)
    k = check_k(k)
    if not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise ValueError(f"workspace_mb: must be a positive int, got {workspace_mb!r}")
    q = metric_rows(query, "query", metric)
    extension.require()
    if isinstance(ref, (torch.Tensor, np.ndarray)):
        r = metric_rows(ref, "ref", metric)
        check_pair(q, r)
        if exclude_self and r.shape[0] != q.shape[0]:
            raise ValueError(f"exclude_self: query and ref must be the same set, got {q.shape[0]} and {r.shape[0]} rows")
        eligible = r.shape[0] - int(exclude_self)
        if k > eligible:
            raise ValueError(f"k: {k} is larger than the number of eligible references ({eligible})")
        return search_chunk(q, r, k, metric, 0, exclude_self, workspace_mb)
    return _knn_streaming(q, ref, k, metric, exclude_self, workspace_mb)


def _knn_streaming(
    q: torch.Tensor, chunks: Iterable[ArrayLike], k: int, metric: str, exclude_self: bool, workspace_mb: int
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        iterator = iter(chunks)
    except TypeError:
        raise TypeError(f"ref: expected a tensor, numpy array or iterable of chunks, got {type(chunks).__name__}")
    dist = index = None
    total = 0
    for number, chunk in enumerate(iterator):
        r = metric_rows(chunk, f"ref (chunk {number})", metric)
        d, i = search_chunk(q, r, k, metric, total, exclude_self, workspace_mb)
        dist, index = (d, i) if dist is None else merge_topk(dist, index, d, i, k)
        total += r.shape[0]
    if dist is None:
        raise ValueError("ref: the iterable of chunks is empty")
    if exclude_self and total != q.shape[0]:
        raise ValueError(f"exclude_self: query and ref must be the same set, got {q.shape[0]} and {total} rows")
    eligible = total - int(exclude_self)
    if k > eligible:
        raise ValueError(f"k: {k} is larger than the number of eligible references ({eligible})")
    return dist, index
