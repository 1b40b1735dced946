"""Drop-in loss modules for existing training loops (`biasfast.nn`), on the fused loss ops."""

from __future__ import annotations

import torch

from biasfast._core.constants import REDUCTIONS
from biasfast.ops.snr_loss import snr_weighted_loss
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.diffusion.weighting import weighting as weight_table


class SNRWeightedLoss(torch.nn.Module):
    """`loss = criterion(model_pred, target, timesteps)` with per-timestep weights from `biasfast.weighting`.

    The default is the Unmasking-Bias (Debias) weighting 1/√SNR for an ε-predicting model. The weight table
    is a float64 buffer: `criterion.to(device)` once avoids copying it to the inputs' device every step.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        weighting: str = "debias",
        prediction: str = "epsilon",
        *,
        reduction: str = "mean",
        return_per_sample: bool = False,
        **params,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.weighting, self.prediction, self.reduction = weighting, prediction, reduction
        self.return_per_sample = return_per_sample
        self.register_buffer("weights", weight_table(weighting, schedule, prediction, **params), persistent=False)

    def forward(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights.to(model_pred.device)
        return snr_weighted_loss(model_pred, target, timesteps, weights, self.reduction, self.return_per_sample)

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, prediction={self.prediction!r}, reduction={self.reduction!r}"

