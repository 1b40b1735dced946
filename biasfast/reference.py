"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

import torch


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by direct differences, (n, d) x (m, d) -> (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


# ---- hierarchical model: belief propagation on the binary tree (issue 8) ----


def tree_bp(
    evidence: torch.Tensor, scale: torch.Tensor, grammar: torch.Tensor, top: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf marginals (B, L, q) and log partition (B,) of a k-filtered tree model, plain linear-space einsums.

    Leaf log-evidence is scale[b]·evidence[b] (B, L = 2^depth, q); `grammar` M[a, b, c] = P(b, c | a);
    `top` (2^k, q, q) holds P_j[a, b] = P(depth-k node j = b | root = a) (the identity for k = 0); uniform root.
    Messages are renormalised per node, their normalisers summed in log space.
    """
    batch, leaves, q = evidence.shape
    depth, k = leaves.bit_length() - 1, top.shape[0].bit_length() - 1
    field = scale[:, None, None] * evidence
    lead = field.amax(-1, keepdim=True)
    up = {depth: torch.exp(field - lead)}
    log_z = lead.sum((1, 2))

    def normalise(m: torch.Tensor) -> torch.Tensor:
        nonlocal log_z
        total = m.sum(-1, keepdim=True)
        log_z = log_z + total.log().sum((1, 2))
        return m / total

    for d in reversed(range(k, depth)):
        child = up[d + 1]
        up[d] = normalise(torch.einsum("abc,nib,nic->nia", grammar, child[:, 0::2], child[:, 1::2]))
    to_root = normalise(torch.einsum("jab,njb->nja", top, up[k]))
    log_z = log_z + (to_root.prod(1).sum(-1) / q).log()
    others = ~torch.eye(top.shape[0], dtype=torch.bool)
    cavity = torch.stack([to_root[:, others[j]].prod(1) for j in range(top.shape[0])], dim=1)
    down = torch.einsum("jab,nja->njb", top, cavity)
    for d in range(k, depth):
        down = down / down.sum(-1, keepdim=True)
        left, right = up[d + 1][:, 0::2], up[d + 1][:, 1::2]
        to_left = torch.einsum("nia,abc,nic->nib", down, grammar, right)
        to_right = torch.einsum("nia,abc,nib->nic", down, grammar, left)
        down = torch.stack([to_left, to_right], dim=2).reshape(batch, -1, q)
    belief = up[depth] * down
    return belief / belief.sum(-1, keepdim=True), log_z
