"""`biasfast::tree_bp`: exact belief propagation on the hierarchical model's binary tree (leaf posteriors and the
log partition of a k-filtered tree model), the exact denoiser behind `FilteredHierarchicalModel`."""

from __future__ import annotations

import torch

from biasfast._core import dispatch
from biasfast._core.extension import accumulate_dtype


def tree_bp(
    log_evidence: torch.Tensor, grammar: torch.Tensor, top: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact leaf posteriors (B, L, q) and log partition (B,) for leaf log-potentials scale[b]·log_evidence[b].

    `grammar` is M (q, q, q); `top` (2^k, q, q) the root-to-depth-k matrices of the k-filtered model (identity
    for the full model); the root is uniform. A row whose evidence is impossible has log partition −inf and NaN
    posteriors. float32 for float32/float16/bfloat16 evidence, float64 for float64. Shapes and dtypes are checked
    by the kernels (the C++ kernel on CPU tensors, the Triton kernel on CUDA tensors), with the same messages.
    """
    if scale is None:
        scale = log_evidence.new_ones(log_evidence.shape[0])
    operator = dispatch.op("tree_bp")
    dispatch.require_kernel("tree_bp", log_evidence, "log_evidence")
    return operator(log_evidence, scale, grammar, top)


def _fake(evidence, scale, grammar, top):
    torch._check(evidence.dim() == 3, lambda: "tree_bp: evidence must be (batch, leaves, q)")
    torch._check(scale.dim() == 1 and scale.shape[0] == evidence.shape[0], lambda: "tree_bp: scale must be (batch,)")
    torch._check(grammar.dim() == 3 and top.dim() == 3, lambda: "tree_bp: grammar and top must be 3-D")
    dtype = accumulate_dtype(evidence.dtype)
    return evidence.new_empty(evidence.shape, dtype=dtype), evidence.new_empty((evidence.shape[0],), dtype=dtype)


def register() -> None:
    # BP is used for exact posteriors, never differentiated: no autograd formula.
    torch.library.register_fake("biasfast::tree_bp")(_fake)
    dispatch.register_triton("tree_bp", "biasfast.kernels.tree_bp", "tree_bp")
