"""Exact k-nearest neighbours: in memory, or streaming a reference set larger than memory in chunks.

Every result equals a float64 brute force up to genuine ties (ties go to the lower index): candidates come
from tiled inner products and are re-ranked with exact differences (see `csrc/cpu/knn.cpp`).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Union

import numpy as np
import torch

from biasfast import _extension

ArrayLike = Union[torch.Tensor, np.ndarray]
FLOAT_METRICS = ("l2", "sqeuclidean", "cosine", "pearson")
METRICS = FLOAT_METRICS + ("hamming",)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_rows(value: object, name: str, metric: str) -> torch.Tensor:
    """A 2-D (rows, features) view of a tensor or numpy array (memmaps stay mapped), dtype checked for `metric`."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise TypeError(f"{name}: unsupported numpy dtype {value.dtype}")
        with warnings.catch_warnings():  # read-only arrays (memmaps) are never written to
            warnings.simplefilter("ignore", UserWarning)
            value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.dim() < 2:
        raise ValueError(f"{name}: expected (rows, features...) with at least 2 dimensions, got shape {tuple(value.shape)}")
    if metric == "hamming":
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name}: metric 'hamming' needs integer token tensors, got dtype {value.dtype}")
    elif value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: metric '{metric}' needs float32/float16/bfloat16/float64, got dtype {value.dtype}")
    rows = value.reshape(value.shape[0], math.prod(value.shape[1:]))
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(value.shape)})")
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
        device = query.device.type
        if device != "cpu" and not _extension.has_kernel("knn_hamming", device.upper()):
            raise ValueError(f"query: metric 'hamming' has no kernel for {query.device} in this build (CPU, and CUDA "
                             "when built with a CUDA toolkit)")
        return torch.ops.biasfast.knn_hamming(query, ref, k, offset, exclude_self)
    return torch.ops.biasfast.knn(query, ref, k, metric, offset, exclude_self, workspace_mb)


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
    q = as_rows(query, "query", metric)
    _extension.require()
    if isinstance(ref, (torch.Tensor, np.ndarray)):
        r = as_rows(ref, "ref", metric)
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
        r = as_rows(chunk, f"ref (chunk {number})", metric)
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
