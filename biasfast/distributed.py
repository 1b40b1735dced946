"""Exact kNN over a reference set sharded across torch.distributed ranks (filled in by issue 3, milestone 4)."""
