"""The estimators of the hierarchical-data bias experiments, as the paper's official scripts define them.

- `sequence_kl`: Σ_i KL(p_i ‖ q_i) over the positions of a sequence, both sides clipped to [1e-8, 1]
  (`kl_divergence_batch` of `sequential_learning.py`).
- `histogram_kl`: KL(P_gen ‖ P_test) of nearest-neighbour Hamming histograms, bins linspace(0, L, 21), both clipped
  to [1e-8, 1] (`nn_divergence.py`; histograms normalised to probability mass).
- `loss_terms`: the exact split of the cross-entropy ℓ = ℓ* + ℓ̃ with ℓ* = −b0ᵀ log p_θ (`loss_decomposition.py`).
- `overlap`: the fraction of positions where two sequences agree (`uturn_overlap.py`).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8
NN_BINS = 20


def sequence_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) summed over positions: (..., L, q) × (..., L, q) → (...), float64."""
    if p.shape != q.shape:
        raise ValueError(f"q: shape {tuple(q.shape)} differs from p's {tuple(p.shape)}")
    p, q = p.double().clamp(EPS, 1.0), q.double().clamp(EPS, 1.0)
    return (p * (p.log() - q.log())).sum((-1, -2))


def nn_histogram(distances: torch.Tensor, length: int, bins: int = NN_BINS) -> torch.Tensor:
    """Probability mass of nearest-neighbour Hamming distances in `bins` equal bins over [0, length]."""
    counts = torch.histc(distances.double(), bins=bins, min=0, max=length)
    return counts / counts.sum()


def loss_terms(logits: torch.Tensor, tokens: torch.Tensor, marginals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence means over positions of ℓ = −x0ᵀ log p, ℓ* = −b0ᵀ log p, ℓ̃ = ℓ − ℓ* and H(b0).

    `marginals` are the exact posteriors b0 = E[x0 | x_t]; on fresh data E[ℓ̃] = 0 for any network, on its
    training data ℓ̃ < 0 measures how much the network exploits the identity of the training samples.
    """
    log_p = logits.double().log_softmax(-1)
    b0 = marginals.double()
    ce = -log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).mean(-1)
    star = -(b0 * log_p).sum(-1).mean(-1)
    entropy = -(b0 * b0.clamp_min(1e-300).log()).sum(-1).mean(-1)
    return {"ce": ce, "distill": star, "excess": ce - star, "bayes": entropy}


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where token sequences (..., L) agree, float64."""
    if a.shape != b.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} differs from a's {tuple(a.shape)}")
    return (a == b).double().mean(-1)


def argmin_epoch(epochs: list[int], values: list[float]) -> int | None:
    """Epoch of the smallest finite value (the earliest on ties)."""
    finite = [(v, e) for e, v in zip(epochs, values) if v is not None and math.isfinite(v)]
    return min(finite)[1] if finite else None
