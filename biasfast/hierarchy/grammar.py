"""The grammar of the filtered hierarchical model (Garnier-Brun et al., arXiv 2408.15138, with forbidden pairs).

M[a, b, c] = P(left = b, right = c | parent = a), shared by every node; built exactly as the public generator
`get_M_wforbidden(q, sigma, q_eff)` after `np.random.seed(seed)`, so seed 0 reproduces the paper's grammar.
"""

from __future__ import annotations

import numpy as np
import torch


def make_grammar(q: int, sigma: float, q_eff: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(M as float64 (q, q, q), forbidden sibling pairs).

    The q² ordered child pairs are shuffled and cut into one block of q per parent, so each pair has at most one
    parent (the grammar is unambiguous); the first q_eff pairs of a block get logits sigma·N(0, 1), the others
    are forbidden (probability 0).
    """
    rng = np.random.RandomState(seed)
    pairs = np.array([(b, c) for b in range(q) for c in range(q)])
    rng.shuffle(pairs)
    logits = np.full((q, q, q), -np.inf)
    forbidden = []
    for a in range(q):
        block = pairs[a * q : (a + 1) * q]
        for b, c in block[:q_eff]:
            logits[a, b, c] = sigma * rng.randn()
        forbidden += [(int(b), int(c)) for b, c in block[q_eff:]]
    weights = np.exp(logits - logits.reshape(q, -1).max(axis=1)[:, None, None])
    grammar = weights / weights.reshape(q, -1).sum(axis=1)[:, None, None]
    return torch.from_numpy(grammar), forbidden


def path_matrices(grammar: torch.Tensor, k: int) -> torch.Tensor:
    """P_j (2^k, q, q): P_j[a, b] = P(node j at depth k = b | root = a), the product of M_L / M_R along its path.

    Node j's path is the k binary digits of j, most significant first (0 = left child), as in the public
    `get_P_xlevel_root`. For k = 0 this is the identity (the root itself).
    """
    q = grammar.shape[0]
    left, right = grammar.sum(dim=2), grammar.sum(dim=1)
    matrices = torch.eye(q, dtype=grammar.dtype)[None]
    for _ in range(k):
        matrices = torch.stack([matrices @ left, matrices @ right], dim=1).reshape(-1, q, q)
    return matrices
