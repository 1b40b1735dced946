"""biasfast.distributed.knn on 2 gloo ranks (spawned on localhost) equals single-process biasfast.knn."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import biasfast
from biasfast.neighbors import distributed

WORLD = 2


def _worker(rank: int, init_file: str, cases: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for query, ref, k, metric, exclude_self, query_split, shard_split in cases:
            q_start, q_end = query_split[rank], query_split[rank + 1]
            r_start, r_end = shard_split[rank], shard_split[rank + 1]
            got = distributed.knn(query[q_start:q_end], ref[r_start:r_end], k, metric, exclude_self=exclude_self)
            expected = biasfast.knn(query, ref, k, metric, exclude_self=exclude_self)
            assert torch.equal(got[1], expected[1][q_start:q_end]), (metric, rank)
            assert torch.equal(got[0], expected[0][q_start:q_end]), (metric, rank)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    torch.manual_seed(0)
    query, ref = torch.randn(23, 9), torch.randn(101, 9)
    ref[70] = ref[10] = query[5]  # duplicates on both shards: the tie must go to global index 10
    tokens = torch.randint(0, 3, (31, 7))
    cases = [
        (query, ref, 4, "l2", False, [0, 11, 23], [0, 50, 101]),
        (query, ref, 3, "cosine", False, [0, 0, 23], [0, 1, 101]),  # a rank with no queries
        (ref, ref, 5, "sqeuclidean", True, [0, 40, 101], [0, 40, 101]),
        (tokens, tokens, 2, "hamming", True, [0, 16, 31], [0, 16, 31]),
        (query.double(), ref, 2, "pearson", False, [0, 12, 23], [0, 101, 101]),  # an empty shard
    ]
    mp.spawn(_worker, args=(str(tmp_path / "init"), cases), nprocs=WORLD, join=True)


def test_single_rank_group_checks_k(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"k: 9 is larger than the number of eligible references \(8\)"):
            distributed.knn(torch.randn(2, 3), torch.randn(8, 3), 9)
    finally:
        dist.destroy_process_group()
