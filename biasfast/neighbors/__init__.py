"""Exact nearest neighbours and distances: `knn` (in memory or streamed), `pairwise_distances`, and the
`distributed.knn` search over a reference set sharded across torch.distributed ranks."""

from biasfast.neighbors.distances import pairwise_distances
from biasfast.neighbors.knn import knn

__all__ = ["knn", "pairwise_distances"]
