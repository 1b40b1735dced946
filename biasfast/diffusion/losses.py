"""Drop-in loss modules for existing training loops (`biasfast.nn`), on the fused loss ops."""

from __future__ import annotations

import torch

from biasfast._core.constants import REDUCTIONS
from biasfast.ops.hybrid_loss import PREDICTIONS as HYBRID_PREDICTIONS
from biasfast.ops.hybrid_loss import hybrid_loss_from_table, hybrid_loss_table
from biasfast.ops.snr_loss import snr_weighted_loss
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.diffusion.weighting import weighting as weight_table


class _WeightedLoss(torch.nn.Module):
    """What every loss module shares: the reduction check and the per-timestep weight table, built once as a
    float64 buffer from `biasfast.weighting` (`criterion.to(device)` once avoids copying it every step)."""

    def __init__(self, schedule: NoiseSchedule, weighting: str, prediction: str, reduction: str, **params) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.weighting, self.prediction, self.reduction = weighting, prediction, reduction
        self.register_buffer("weights", weight_table(weighting, schedule, prediction, **params), persistent=False)

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, prediction={self.prediction!r}, reduction={self.reduction!r}"


class SNRWeightedLoss(_WeightedLoss):
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
        super().__init__(schedule, weighting, prediction, reduction, **params)
        self.return_per_sample = return_per_sample

    def forward(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights.to(model_pred.device)
        return snr_weighted_loss(model_pred, target, timesteps, weights, self.reduction, self.return_per_sample)


class HybridLoss(_WeightedLoss):
    """`loss = criterion(model_output, x_start, noise, timesteps)`: guided-diffusion's learned-variance hybrid
    loss (weighted MSE + L_vlb × T/1000, as the released Debias code trains), on the fused op.

    `model_output` (B, 2C, ...) is the prediction followed by the variance channels v. `weighting` weights the
    MSE term only ("debias" = 1/√SNR; "constant" = guided-diffusion's plain hybrid loss). The coefficient table
    and the weights are built once here, as float64 buffers: `criterion.to(device)` once avoids a copy per step.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        weighting: str = "debias",
        prediction: str = "epsilon",
        *,
        reduction: str = "mean",
        return_terms: bool = False,
        **params,
    ) -> None:
        if prediction not in HYBRID_PREDICTIONS:
            raise ValueError(f"prediction: expected one of {HYBRID_PREDICTIONS}, got {prediction!r}")
        super().__init__(schedule, weighting, prediction, reduction, **params)
        self.return_terms = return_terms
        self.register_buffer("table", hybrid_loss_table(schedule), persistent=False)

    def forward(
        self, model_output: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = model_output.device
        return hybrid_loss_from_table(model_output, x_start, noise, timesteps, self.table.to(device),
                                      self.weights.to(device), prediction=self.prediction,
                                      reduction=self.reduction, return_terms=self.return_terms)
