"""Exact belief propagation on the hierarchical model's tree, on the fused `biasfast::tree_bp` kernel.

All evidence is given as leaf log-potentials: Gaussian noise on one-hot tokens (the diffusion denoiser), observed
tokens (likelihoods) or observed-or-masked tokens; the same engine turns them into exact leaf posteriors.
"""

from __future__ import annotations

import torch

from biasfast import _extension, kernels
from biasfast._validation import check_finite, check_floating, check_tensor


def tree_bp(
    log_evidence: torch.Tensor, grammar: torch.Tensor, top: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact leaf posteriors (B, L, q) and log partition (B,) for leaf log-potentials scale[b]·log_evidence[b].

    `grammar` is M (q, q, q); `top` (2^k, q, q) the root-to-depth-k matrices of the k-filtered model (identity
    for the full model); the root is uniform. A row whose evidence is impossible has log partition −inf and NaN
    posteriors. float32 for float32/float16/bfloat16 evidence, float64 for float64. CPU tensors run the C++
    kernel, CUDA tensors the Triton kernel (`biasfast::tree_bp_triton`).
    """
    if scale is None:
        scale = log_evidence.new_ones(log_evidence.shape[0])
    return _operator(log_evidence.device)(log_evidence, scale, grammar, top)


def _operator(device: torch.device):
    """The C++ kernel on the CPU, the Triton kernel on CUDA; never a silent fallback to the reference."""
    if device.type == "cuda":
        if "tree_bp_triton" not in kernels.TRITON_OPS:
            raise RuntimeError("log_evidence: tree BP on CUDA tensors needs Triton (pip install triton)")
        return torch.ops.biasfast.tree_bp_triton
    _extension.require()
    return torch.ops.biasfast.tree_bp


def check_sequences(tokens: object, q: int, leaves: int, name: str) -> torch.Tensor:
    """Integer tokens (B, leaves) in [0, q)."""
    check_tensor(tokens, name)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor of tokens, got dtype {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[1] != leaves:
        raise ValueError(f"{name}: expected shape (batch, {leaves}), got {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= q):
        raise ValueError(f"{name}: tokens must lie in [0, {q}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens


def check_noisy(x_t: object, alpha_bar: object, q: int, leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t (*batch, leaves, q) floating and finite; ᾱ in (0, 1] broadcast to the batch shape, as float64."""
    check_tensor(x_t, "x_t")
    check_floating(x_t, "x_t")
    if x_t.dim() < 2 or tuple(x_t.shape[-2:]) != (leaves, q):
        raise ValueError(f"x_t: expected shape (..., {leaves}, {q}), got {tuple(x_t.shape)}")
    check_finite(x_t.reshape(-1, leaves * q), "x_t")
    batch = x_t.shape[:-2]
    alpha = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x_t.device)
    try:
        alpha = alpha.expand(batch)
    except RuntimeError:
        raise ValueError(f"alpha_bar: shape {tuple(alpha.shape)} does not broadcast to the batch shape {tuple(batch)}")
    if alpha.numel() and not bool(((alpha > 0) & (alpha <= 1)).all()):
        raise ValueError(f"alpha_bar: must lie in (0, 1], got values in [{float(alpha.min())}, {float(alpha.max())}]")
    return x_t, alpha


def gaussian_evidence(x_t: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(evidence (B, L, q), scale (B,)) for x_t = sqrt(ᾱ)·onehot(x0) + sqrt(1 − ᾱ)·ε.

    log ψ_i(a) = sqrt(ᾱ)/(1 − ᾱ)·x_t[i, a]; at ᾱ = 1 (no noise) the limit keeps each leaf's largest entries.
    """
    leaves, q = x_t.shape[-2:]
    evidence = x_t.reshape(-1, leaves, q)
    alpha = alpha_bar.reshape(-1)
    clean = alpha == 1
    scale = alpha.sqrt() / torch.where(clean, 1.0, 1 - alpha)
    if bool(clean.any()):
        peaks = torch.where(evidence == evidence.amax(-1, keepdim=True), 0.0, -torch.inf).to(evidence.dtype)
        evidence = torch.where(clean[:, None, None], peaks, evidence)
        scale = torch.where(clean, 1.0, scale)
    return evidence, scale.to(_compute_dtype(x_t.dtype))


def token_evidence(tokens: torch.Tensor, q: int, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-potentials (B, L, q): 0 for the observed token and −inf for the others; 0 everywhere where masked."""
    evidence = torch.full(tokens.shape + (q,), -torch.inf, dtype=dtype, device=tokens.device)
    evidence.scatter_(-1, tokens.unsqueeze(-1), 0.0)
    if mask is not None:
        evidence.masked_fill_(mask.unsqueeze(-1), 0.0)
    return evidence


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
