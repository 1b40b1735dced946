"""`bias_score` over training sets sharded across torch.distributed ranks.

The samples are the same on every rank, so each rank streams its own shards with the local exact kNN and
only (samples × k) distances, row counts and row hashes are exchanged: the global k nearest distances are
the k smallest of the ranks' k nearest. Shards may have any size and any number of chunks (no per-chunk
collectives), and a failure on one rank is reported on every rank instead of leaving the others waiting.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from biasfast.metrics.search import NearestDistances, keep_smallest
from biasfast.ops.row_hash import row_hash


def _collective_device(group: Any) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, group: Any, device: torch.device) -> list[torch.Tensor]:
    """Gather equally shaped tensors from every rank (on the collective device, returned there)."""
    import torch.distributed as dist

    local = tensor.to(device).contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return gathered


def _all_gather_varying(tensor: torch.Tensor, group: Any, device: torch.device) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every rank, in rank order."""
    lengths = _all_gather(torch.tensor([tensor.numel()]), group, device)
    longest = int(max(int(length) for length in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype)
    padded[: tensor.numel()] = tensor.cpu()
    pieces = _all_gather(padded, group, device)
    return torch.cat([piece[: int(length)] for piece, length in zip(pieces, lengths)])


def _merge(near: NearestDistances, group: Any, device: torch.device) -> NearestDistances:
    def smallest(local: torch.Tensor) -> torch.Tensor:
        gathered = torch.cat([g.to(local.device) for g in _all_gather(local, group, device)], dim=1)
        return keep_smallest(local, gathered)

    rows = sum(int(r) for r in _all_gather(torch.tensor([near.rows]), group, device))
    hashes = _all_gather_varying(near.hashes, group, device).to(near.hashes.device)
    return NearestDistances(smallest(near.metric), smallest(near.gap), hashes, rows)


def search_shards(
    search: Callable[[], tuple[NearestDistances, NearestDistances]], queries: torch.Tensor, group: Any
) -> tuple[NearestDistances, NearestDistances]:
    """Run `search` on this rank's shards, check every rank succeeded on the same samples, then merge."""
    import torch.distributed as dist

    device = _collective_device(group)
    error: BaseException | None = None
    try:
        found = search()
    except Exception as caught:  # re-raised below, after telling the other ranks
        error = caught
    fingerprint = int(row_hash(row_hash(queries).view(1, -1))[0])
    status = _all_gather(torch.tensor([int(error is not None), fingerprint]), group, device)
    failed = [rank for rank, s in enumerate(status) if int(s[0])]
    if error is not None:
        # Drop the local before raising: the traceback holds this frame, and a frame that holds its own
        # exception is a cycle that keeps the process group alive until interpreter shutdown, where gloo's
        # threads, joined during the final collection, abort the process.
        try:
            raise error
        finally:
            error = None
    if failed:
        raise RuntimeError(f"bias_score failed on rank(s) {failed} of the group; see the error raised there")
    if len({int(s[1]) for s in status}) > 1:
        raise ValueError("samples_a, samples_b and test must be the same on every rank (only the training sets "
                         f"are sharded), but they differ between ranks (rank {dist.get_rank(group)} of the group)")
    near_a, near_b = found
    return _merge(near_a, group, device), _merge(near_b, group, device)
