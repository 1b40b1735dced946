"""The fused SNR-weighted diffusion loss: one pass over pred and target gives the loss and its gradient."""

from __future__ import annotations

import torch

from biasfast import _extension, kernels
from biasfast._validation import check_floating, check_same_device, check_tensor

REDUCTIONS = ("mean", "sum", "none")


def _check_loss_args(pred, target, timesteps, weights, reduction) -> None:
    """Metadata checks (no host sync); values (timestep range, finite non-negative weights) are checked by the op."""
    for name, t in (("pred", pred), ("target", target), ("timesteps", timesteps), ("weights", weights)):
        check_tensor(t, name)
    check_floating(pred, "pred")
    check_floating(weights, "weights")
    if pred.dim() < 1 or pred.shape[0] == 0 or pred.numel() == 0:
        raise ValueError(f"pred: expected a (batch, ...) tensor with at least one element per sample, got shape "
                         f"{tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target: shape {tuple(target.shape)} does not match pred's {tuple(pred.shape)}")
    if target.dtype != pred.dtype:
        raise TypeError(f"target: dtype {target.dtype} does not match pred's {pred.dtype} (cast one, e.g. .float())")
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps: expected an integer tensor, got dtype {timesteps.dtype}")
    if timesteps.dim() != 1 or timesteps.shape[0] != pred.shape[0]:
        raise ValueError(f"timesteps: expected shape ({pred.shape[0]},), one per sample, got {tuple(timesteps.shape)}")
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"weights: expected a non-empty 1-D table indexed by timestep, got shape {tuple(weights.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_same_device({"pred": pred, "target": target, "timesteps": timesteps, "weights": weights})


def _operator(pred: torch.Tensor):
    if pred.device.type == "cuda":
        if not kernels.enabled():
            raise RuntimeError("snr_weighted_loss on CUDA tensors needs triton (pip install triton)")
        return torch.ops.biasfast.snr_loss_triton
    _extension.require()
    return torch.ops.biasfast.snr_loss


def snr_weighted_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    weights: torch.Tensor,
    reduction: str = "mean",
    return_per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reduce_b( weights[timesteps[b]] · mean_i (pred_bi − target_bi)² ) for pred, target of shape (B, ...).

    `weights` is a per-timestep table such as `biasfast.weighting("debias", schedule)`. The loss is float32
    (float64 for float64 inputs) with float32 accumulation; differentiable in pred, target and weights.
    With `return_per_sample`, also returns the unweighted per-sample MSE (B,) (no gradient) for logging
    the loss by timestep without another pass. Bit-for-bit deterministic.
    """
    _check_loss_args(pred, target, timesteps, weights, reduction)
    compute_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, mse, _ = _operator(pred)(pred, target, timesteps, weights, reduction, compute_grad)
    return (loss, mse) if return_per_sample else loss
