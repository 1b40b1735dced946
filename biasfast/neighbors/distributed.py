"""Exact kNN over a reference set sharded across torch.distributed ranks (gloo on CPU, nccl on GPU).

Every rank gathers all queries, searches its own shard (indices offset to global positions), and the
(distance, global index) candidates of all shards are merged into the exact global top-k; ties go to the lower
global index, so the result equals a single-process `biasfast.knn` on the concatenated shards.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from biasfast._core.checks import ArrayLike
from biasfast.neighbors.knn import check_k, check_metric, merge_topk, metric_rows, search_chunk


def _all_gather_rows(rows: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); rows differ in number, so they travel padded."""
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def knn(
    query: ArrayLike,
    ref_shard: ArrayLike,
    k: int = 1,
    metric: str = "l2",
    group: dist.ProcessGroup | None = None,
    *,
    exclude_self: bool = False,
    workspace_mb: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's queries' exact k nearest neighbours in the union of every rank's `ref_shard`.

    Shards are numbered in rank order: global index = (rows of lower ranks) + local row. With `exclude_self`,
    each rank's `query` must be its own shard (the global query i is then reference i). Collective: every rank of
    `group` must call it with the same k and metric.
    """
    metric = check_metric(metric)
    k = check_k(k)
    q = metric_rows(query, "query", metric, allow_empty=True)
    if q.dtype != torch.float64 and metric != "hamming":
        q = q.float()
    r = metric_rows(ref_shard, "ref_shard", metric, allow_empty=True)
    world = dist.get_world_size(group)
    local = torch.tensor([q.shape[0], r.shape[0], q.shape[1], int(q.dtype == torch.float64)], device=q.device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    sizes = torch.stack(sizes).cpu()
    if (sizes[:, 2] != q.shape[1]).any():
        raise ValueError(f"query: feature sizes differ across ranks: {sizes[:, 2].tolist()}")
    query_counts, shard_counts = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    rank = dist.get_rank(group)
    total = sum(shard_counts)
    if exclude_self and query_counts != shard_counts:
        raise ValueError("exclude_self: every rank's query must be its own ref_shard")
    if k > total - int(exclude_self):
        raise ValueError(f"k: {k} is larger than the number of eligible references ({total - int(exclude_self)})")
    if bool(sizes[:, 3].any()):
        q = q.double()
    everyone = _all_gather_rows(q, query_counts, group)
    offset = sum(shard_counts[:rank])
    if r.shape[0] > 0:
        distances, indices = search_chunk(everyone, r, k, metric, offset, exclude_self, workspace_mb)
    else:
        out_dtype = torch.float64 if everyone.dtype == torch.float64 else torch.float32
        distances = torch.full((everyone.shape[0], k), float("inf"), dtype=out_dtype, device=q.device)
        indices = torch.full((everyone.shape[0], k), -1, dtype=torch.int64, device=q.device)
    all_distances = [torch.empty_like(distances) for _ in range(world)]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(all_distances, distances, group=group)
    dist.all_gather(all_indices, indices, group=group)
    start = sum(query_counts[:rank])
    mine = slice(start, start + q.shape[0])
    best_d, best_i = all_distances[0][mine], all_indices[0][mine]
    for d, i in zip(all_distances[1:], all_indices[1:]):
        best_d, best_i = merge_topk(best_d, best_i, d[mine], i[mine], k)
    return best_d, best_i
