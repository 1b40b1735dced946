"""The streaming searches behind `bias_score`: each training chunk is read once and searched for every
sample at once with the exact kNN; only the running (samples × k) nearest distances are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import numpy as np
import torch

from biasfast._core.checks import ArrayLike, as_rows
from biasfast.neighbors.knn import knn
from biasfast.ops.row_hash import row_hash

TrainingSet = Union[ArrayLike, Iterable[ArrayLike]]


# ---- inputs -------------------------------------------------------------------------------------


def searchable(rows: torch.Tensor, metric: str, name: str) -> torch.Tensor:
    """Integer tokens for hamming; any floating dtype (integer images as float32) otherwise."""
    if metric == "hamming":
        if rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"{name}: metric 'hamming' needs integer token tensors, got dtype {rows.dtype}")
        return rows
    if rows.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported")
    return rows if rows.is_floating_point() else rows.float()


def chunks(train: TrainingSet, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(label for messages, 2-D rows) for a tensor, an array or an iterable of either."""
    if isinstance(train, (torch.Tensor, np.ndarray)):
        yield name, as_rows(train, name, allow_empty=True)
        return
    if isinstance(train, (str, bytes)) or not isinstance(train, Iterable):
        raise TypeError(f"{name}: expected a tensor, an array or an iterable of chunks, got {type(train).__name__}")
    for i, chunk in enumerate(train):
        label = f"{name} (chunk {i})"
        yield label, as_rows(chunk, label, allow_empty=True)


def in_query_dtype(chunk: torch.Tensor, dtype: torch.dtype, label: str) -> torch.Tensor:
    """A searchable chunk in the queries' dtype. Tokens that dtype cannot hold are an error: cast, they would wrap
    around (300 → 44, 2 → True) and could equal a sample's token, giving wrong Hamming distances and overlaps."""
    cast = chunk.to(dtype)
    if chunk.dtype != dtype and not chunk.is_floating_point():
        back = cast.to(chunk.dtype)
        if not torch.equal(back, chunk):
            row, column = (int(i) for i in (back != chunk).nonzero()[0])
            raise ValueError(f"{label}: token {chunk[row, column].item()} (row {row}) does not fit the samples' dtype "
                             f"{dtype}; pass samples and training sets in a token dtype that holds every token")
    return cast


# ---- streaming nearest distances ----------------------------------------------------------------


def keep_smallest(running: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The running.shape[1] smallest distances per row of `running` and `new` (float64)."""
    k = running.shape[1]
    return torch.cat([running, new.to(running)], dim=1).sort(dim=1).values[:, :k]


@dataclass
class NearestDistances:
    """What one pass over a training set yields."""

    metric: torch.Tensor  # (queries, 1 or 2) nearest distances under the chosen metric
    gap: torch.Tensor  # (own samples, 2) nearest and second-nearest distances for the gap ratio
    hashes: torch.Tensor  # row hashes of the training set (for the overlap check)
    rows: int


class SearchPlan:
    """Which searches a metric needs: the gap ratio uses Euclidean distances (Hamming for tokens)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.shared = metric in ("l2", "sqeuclidean", "hamming")  # one k=2 search serves both
        self.metric_k = 2 if self.shared else 1

    def gap_distances(self, metric_distances: torch.Tensor) -> torch.Tensor:
        return metric_distances.sqrt() if self.metric == "sqeuclidean" else metric_distances


QUERY_BLOCK_BYTES = 64 << 20


def _search(queries: torch.Tensor, chunk: torch.Tensor, k: int, metric: str, label: str) -> torch.Tensor:
    """Nearest distances of every query in one chunk; the engine's errors about the chunk name the chunk.

    The engine keeps packed copies of its queries (O(queries × features)); searching blocks of at most
    QUERY_BLOCK_BYTES of queries bounds them (20,000 CIFAR-sized queries would otherwise add ~0.5 GB), at the
    price of re-packing the chunk once per block, which is small next to the inner products.
    """
    rows = max(1, QUERY_BLOCK_BYTES // max(1, queries.shape[1] * queries.element_size()))
    try:
        return torch.cat([knn(block, chunk, k=min(k, chunk.shape[0]), metric=metric)[0]
                          for block in queries.split(rows)])
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from error


def nearest(train: TrainingSet, name: str, queries: torch.Tensor, own: slice, plan: SearchPlan, features: int) -> NearestDistances:
    """One pass over a training set (or a rank's shard of it; +inf distances while it has no rows)."""
    metric_best = queries.new_full((queries.shape[0], plan.metric_k), math.inf, dtype=torch.float64)
    gap_best = queries.new_full((own.stop - own.start, 2), math.inf, dtype=torch.float64)
    hashes, rows = [torch.empty(0, dtype=torch.int64, device=queries.device)], 0
    for label, chunk in chunks(train, name):
        if chunk.shape[0] == 0:
            continue
        if chunk.shape[1] != features:
            raise ValueError(f"{label}: feature size {chunk.shape[1]} does not match the samples' {features}")
        # NaN/Inf rows are found by the engine while it packs the chunk (no extra pass); _search names the chunk.
        chunk = in_query_dtype(searchable(chunk.to(queries.device), plan.metric, label), queries.dtype, label)
        hashes.append(row_hash(chunk))
        metric_best = keep_smallest(metric_best, _search(queries, chunk, plan.metric_k, plan.metric, label))
        if not plan.shared:
            gap_best = keep_smallest(gap_best, _search(queries[own], chunk, 2, "l2", label))
        rows += chunk.shape[0]
    gap = plan.gap_distances(metric_best[own]) if plan.shared else gap_best
    return NearestDistances(metric_best, gap, torch.cat(hashes), rows)
