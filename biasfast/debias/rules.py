"""The exact update rules the recipes share, as small pure functions (tested against hand-computed values).

GroupDRO: kohpangwei/group_DRO `loss.py`; LfF GCE / EMA / relative-difficulty weight: alinlab/LfF;
JTT up-sampling: anniesch/jtt `run_expt.py` (see ../shared/notes/debiasing.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gce_loss(logits: torch.Tensor, labels: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """LfF GeneralizedCELoss, per sample: CE · q · p_y^q with p_y^q detached (gradient of q·(1 − p_y^q)/q)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q: the GCE exponent must lie in (0, 1], got {q}")
    p_y = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    return F.cross_entropy(logits, labels, reduction="none") * q * p_y.detach() ** q


def group_means(losses: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss per group (0 for groups absent from the batch) and the per-group counts."""
    counts = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
    return sums / counts.clamp_min(1), counts


def group_dro_step(
    group_weights: torch.Tensor,
    group_losses: torch.Tensor,
    step_size: float,
    *,
    adjustment: torch.Tensor | None = None,
    group_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exponentiated-gradient step: adjusted = ℓ_g (+ C/√n_g), q ← q·exp(η·adjusted), q ← q/Σq.

    Returns (new weights, robust loss Σ_g q_g·ℓ_g) — with C > 0 the loss uses the adjusted ℓ_g, as the
    reference does in place. The weight update is detached: only the robust loss carries gradients.
    """
    if step_size < 0:
        raise ValueError(f"step_size: the GroupDRO step size η must be >= 0, got {step_size}")
    losses = group_losses
    if adjustment is not None:
        if group_counts is None:
            raise ValueError("group_counts: needed with a generalization adjustment")
        losses = losses + adjustment / group_counts.clamp_min(1).sqrt()
    weights = group_weights * torch.exp(step_size * losses.detach())
    weights = weights / weights.sum()
    return weights, (weights * losses).sum()


class PerSampleEMA:
    """LfF `EMA`: ema_i ← α·ema_i + (1 − α)·ℓ_i per sample index; the first visit copies the loss."""

    def __init__(self, labels: torch.Tensor, alpha: float = 0.7, num_classes: int = 10) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha: the EMA coefficient must lie in [0, 1), got {alpha}")
        self.labels, self.alpha, self.num_classes = labels, alpha, num_classes
        self.values = torch.zeros(labels.numel())
        self.seen = torch.zeros(labels.numel(), dtype=torch.bool)

    def update(self, index: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        old = self.values[index]
        new = torch.where(self.seen[index], self.alpha * old + (1 - self.alpha) * losses, losses)
        self.values[index], self.seen[index] = new, True
        return new

    def class_max(self) -> torch.Tensor:
        """max EMA loss per class over all samples (`max_loss(c)`), 1 where a class has none yet."""
        out = torch.ones(self.num_classes)
        for c in range(self.num_classes):
            vals = self.values[(self.labels == c) & self.seen]
            if vals.numel():
                out[c] = vals.max()
        return out


def relative_difficulty(loss_b: torch.Tensor, loss_d: torch.Tensor) -> torch.Tensor:
    """LfF / DFA weight W = L_b / (L_b + L_d + 1e-8): high where the biased model fails and the target does not."""
    return loss_b / (loss_b + loss_d + 1e-8)


def jtt_indices(error_mask: torch.Tensor, up_weight: int) -> torch.Tensor:
    """JTT stage-2 training indices: every sample once plus the error set λ_up more times (λ_up + 1 in all).

    `up_weight = -1` balances: λ_up = ⌊(N − |E|)/|E|⌋ − 1.
    """
    if error_mask.dtype != torch.bool or error_mask.dim() != 1:
        raise TypeError("error_mask: expected a 1-D bool tensor")
    n, errors = error_mask.numel(), error_mask.nonzero().flatten()
    if up_weight == -1:
        up_weight = (n - errors.numel()) // max(errors.numel(), 1) - 1
    if up_weight < 0:
        raise ValueError(f"up_weight: expected λ_up >= 0 or -1 (balance), got {up_weight}")
    return torch.cat([torch.arange(n), errors.repeat(up_weight)])
