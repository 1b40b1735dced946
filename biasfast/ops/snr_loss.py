"""`biasfast::snr_loss`: the fused SNR-weighted diffusion loss. One pass over pred and target gives the loss and
its gradient (Liger-Kernel style: forward returns d loss / d pred, backward only rescales it)."""

from __future__ import annotations

import torch

from biasfast._core import dispatch
from biasfast._core.checks import check_floating, check_same_device, check_tensor
from biasfast._core.constants import REDUCTIONS
from biasfast._core.extension import accumulate_dtype


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
    operator = dispatch.op("snr_loss")
    dispatch.require_kernel("snr_loss", pred, "pred")
    loss, mse, _ = operator(pred, target, timesteps, weights, reduction, compute_grad)
    return (loss, mse) if return_per_sample else loss


def _fake(pred, target, timesteps, weights, reduction: str, compute_grad: bool):
    torch._check(pred.dim() >= 1, lambda: "snr_loss: pred must have a batch dimension")
    torch._check(target.shape == pred.shape, lambda: "snr_loss: target and pred shapes differ")
    torch._check(timesteps.dim() == 1 and timesteps.shape[0] == pred.shape[0], lambda: "snr_loss: timesteps length")
    torch._check(weights.dim() == 1, lambda: "snr_loss: weights must be 1-D")
    dtype = accumulate_dtype(pred.dtype)
    batch = pred.shape[0]
    loss = pred.new_empty((batch,) if reduction == "none" else (), dtype=dtype)
    mse = pred.new_empty((batch,), dtype=dtype)
    grad = pred.new_empty(pred.shape) if compute_grad else pred.new_empty((0,))
    return loss, mse, grad


def _setup_context(ctx, inputs, output) -> None:
    _, _, timesteps, weights, reduction, _ = inputs
    _, mse, grad = output
    ctx.mark_non_differentiable(mse, grad)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.scale = 1.0 / mse.shape[0] if reduction == "mean" else 1.0
    ctx.weights_meta = (weights.shape, weights.dtype)
    ctx.save_for_backward(grad, timesteps, mse)


def _is_one(grad_loss: torch.Tensor) -> bool:
    # Checking the value syncs a GPU and cannot be traced (compile, AOT tracing use Tensor subclasses),
    # so only eager CPU skips the multiply.
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
    return eager and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0


def scaled_gradient(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """A fused loss's forward gradient times the incoming one (per sample for reduction "none"); shared by the
    fused losses (snr_loss, hybrid_loss), whose forward already returns d loss / d input."""
    if reduction == "none":
        per_sample = grad_loss.view(-1, *([1] * (grad.dim() - 1)))
        return (grad * per_sample).to(grad.dtype)
    return grad if _is_one(grad_loss) else grad * grad_loss  # a 0-d factor keeps grad's dtype


def _backward(ctx, grad_loss, _grad_mse, _grad_grad):
    grad, timesteps, mse = ctx.saved_tensors
    need_pred, need_target, _, need_weights = ctx.needs_input_grad[:4]
    grad_pred = grad_target = grad_weights = None
    if grad_loss is None:
        return None, None, None, None, None, None
    if need_pred or need_target:
        torch._check(
            grad.numel() > 0,
            lambda: "snr_loss: backward needs the gradient from forward; call it with compute_grad=True "
            "(biasfast.snr_weighted_loss does this whenever pred or target requires grad)",
        )
        scaled = scaled_gradient(grad, grad_loss, ctx.reduction)
        grad_pred = scaled if need_pred else None
        grad_target = -scaled if need_target else None
    if need_weights:
        shape, dtype = ctx.weights_meta
        contribution = (grad_loss * ctx.scale * mse).to(dtype)
        # A one-hot matmul instead of index_add_: no atomics, so the same bits on every run on CUDA too.
        one_hot = torch.nn.functional.one_hot(timesteps.long(), shape[0]).to(dtype)
        grad_weights = one_hot.t() @ contribution
    return grad_pred, grad_target, None, grad_weights, None, None


def register() -> None:
    torch.library.register_fake("biasfast::snr_loss")(_fake)
    torch.library.register_autograd("biasfast::snr_loss", _backward, setup_context=_setup_context)
    dispatch.register_triton("snr_loss", "biasfast.kernels.snr_loss", "snr_loss")
