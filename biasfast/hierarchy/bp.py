"""Evidence for exact belief propagation on the hierarchical model's tree (the `biasfast::tree_bp` op).

All evidence is given as leaf log-potentials: Gaussian noise on one-hot tokens (the diffusion denoiser), observed
tokens (likelihoods) or observed-or-masked tokens; the same engine turns them into exact leaf posteriors.
"""

from __future__ import annotations

import torch

from biasfast._core.checks import check_finite, check_floating, check_tensor
from biasfast._core.extension import accumulate_dtype


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
    return evidence, scale.to(accumulate_dtype(x_t.dtype))


def token_evidence(tokens: torch.Tensor, q: int, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-potentials (B, L, q): 0 for the observed token and −inf for the others; 0 everywhere where masked."""
    evidence = torch.full(tokens.shape + (q,), -torch.inf, dtype=dtype, device=tokens.device)
    evidence.scatter_(-1, tokens.unsqueeze(-1), 0.0)
    if mask is not None:
        evidence.masked_fill_(mask.unsqueeze(-1), 0.0)
    return evidence

