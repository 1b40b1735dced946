"""`biasfast::hybrid_loss`: the learned-variance hybrid loss of Improved DDPM as guided-diffusion (and the
released Debias code) trains with it, fused: one pass over the model output gives the loss and its gradient
(Liger-Kernel style: forward returns d loss / d model_output, backward only rescales it).

The ops layer does not know `NoiseSchedule` (biasfast.diffusion sits above it): `schedule` is read duck-typed,
anything with an `alphas_cumprod` tensor, or that tensor itself.
"""

from __future__ import annotations

import torch

from biasfast._core import dispatch
from biasfast._core.checks import check_floating, check_same_device, check_tensor
from biasfast._core.constants import REDUCTIONS
from biasfast._core.extension import accumulate_dtype
from biasfast.ops.snr_loss import scaled_gradient

PREDICTIONS = ("epsilon", "sample")  # guided-diffusion's EPSILON and START_X
# The columns of the per-timestep table, in the order csrc/cpu/hybrid_loss.cpp and kernels/hybrid_loss.py read.
TABLE_COLUMNS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
                 "posterior_log_variance_clipped", "log_betas")


def _alphas_cumprod(schedule: object) -> torch.Tensor:
    table = schedule if isinstance(schedule, torch.Tensor) else getattr(schedule, "alphas_cumprod", None)
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"schedule: expected a NoiseSchedule (anything with an alphas_cumprod tensor) or a 1-D "
                        f"alphas_cumprod tensor, got {type(schedule).__name__}")
    if table.dim() != 1 or table.numel() < 2 or not table.is_floating_point():
        raise ValueError(f"schedule: alphas_cumprod must be a 1-D floating table of at least 2 timesteps, got "
                         f"{table.dtype} of shape {tuple(table.shape)}")
    return table.detach().to(torch.float64)


def hybrid_loss_table(schedule: object) -> torch.Tensor:
    """The (T, 8) float64 per-timestep coefficients the kernels gather (TABLE_COLUMNS), as guided-diffusion's
    GaussianDiffusion.__init__ derives them from the betas. Build it once per schedule (biasfast.nn.HybridLoss
    does). A schedule without 0 < ᾱ_t < 1 everywhere gives non-finite entries, which the op rejects."""
    alphas_cumprod = _alphas_cumprod(schedule)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # log of the posterior variance with its first entry (0 at t = 0) replaced by the second, as guided-diffusion clips it
    clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    columns = {
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        "posterior_log_variance_clipped": clipped,
        "log_betas": betas.log(),
    }
    return torch.stack([columns[name] for name in TABLE_COLUMNS], dim=1)


def _check_args(model_output, x_start, noise, timesteps, table, weights, prediction, reduction) -> None:
    """Metadata checks (no host sync); values (timestep range, finite v, weights, table) are checked by the op."""
    for name, t in (("model_output", model_output), ("x_start", x_start), ("noise", noise),
                    ("timesteps", timesteps), ("weights", weights)):
        check_tensor(t, name)
    check_floating(model_output, "model_output")
    check_floating(weights, "weights")
    if model_output.dim() < 2 or model_output.shape[0] == 0 or model_output.numel() == 0:
        raise ValueError(f"model_output: expected a non-empty (batch, 2·channels, ...) tensor, got shape "
                         f"{tuple(model_output.shape)}")
    if model_output.shape[1] % 2:
        raise ValueError(f"model_output: expected an even channel count (the prediction, then as many variance "
                         f"channels v), got {model_output.shape[1]} channels")
    expected = (model_output.shape[0], model_output.shape[1] // 2, *model_output.shape[2:])
    for name, t in (("x_start", x_start), ("noise", noise)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} (model_output with half its channels), got "
                             f"{tuple(t.shape)}")
        if t.dtype != model_output.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match model_output's {model_output.dtype}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: the hybrid loss is differentiable in model_output only; pass {name}.detach()")
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps: expected an integer tensor, got dtype {timesteps.dtype}")
    if timesteps.dim() != 1 or timesteps.shape[0] != model_output.shape[0]:
        raise ValueError(f"timesteps: expected shape ({model_output.shape[0]},), one per sample, got "
                         f"{tuple(timesteps.shape)}")
    if weights.dim() != 1 or weights.shape[0] != table.shape[0]:
        raise ValueError(f"weights: expected one weight per timestep, shape ({table.shape[0]},), got "
                         f"{tuple(weights.shape)}")
    if weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("weights: the hybrid loss is not differentiable in the weight table; pass weights.detach()")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_same_device({"model_output": model_output, "x_start": x_start, "noise": noise, "timesteps": timesteps,
                       "weights": weights})


def hybrid_loss_from_table(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    table: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    prediction: str = "epsilon",
    reduction: str = "mean",
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hybrid_loss` on a prebuilt `hybrid_loss_table` (what a training loop calls every step)."""
    check_tensor(model_output, "model_output")
    check_tensor(table, "table")
    table = table.to(model_output.device)
    if weights is None:
        weights = torch.ones(table.shape[0], dtype=torch.float64, device=model_output.device)
    _check_args(model_output, x_start, noise, timesteps, table, weights, prediction, reduction)
    compute_grad = torch.is_grad_enabled() and model_output.requires_grad
    dispatch.require_kernel("hybrid_loss", model_output, "model_output")
    loss, mse, vb, _ = dispatch.op("hybrid_loss")(model_output, x_start, noise, timesteps, table, weights,
                                                  prediction, reduction, compute_grad)
    return (loss, mse, vb) if return_terms else loss


def hybrid_loss(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: object,
    weights: torch.Tensor | None = None,
    *,
    prediction: str = "epsilon",
    reduction: str = "mean",
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduce_b( w_t·mean((target − pred)²) + vb_t·T/1000 ): guided-diffusion's RESCALED_MSE hybrid loss.

    `model_output` (B, 2C, ...) holds the prediction (ε, or x0 with prediction="sample") and then the variance
    interpolation v of LEARNED_RANGE: log σ² = (v+1)/2·log β_t + (1 − (v+1)/2)·log β̃_t. x_t is never needed:
    the kernel reads x_start and noise. `weights` (T,) weights the MSE term only (None: constant 1), e.g.
    `biasfast.weighting("debias", schedule)`; vb, L_vlb in bits per dim (the decoder NLL at t = 0, the KL
    otherwise), is not re-weighted, and its gradient reaches v only (stop-gradient on the mean). With
    `return_terms`, also the per-sample unweighted mse and the rescaled vb, (B,) each, without gradient.
    Float32 (float64 for float64 inputs) with float32 accumulation; bit-for-bit deterministic.
    """
    return hybrid_loss_from_table(model_output, x_start, noise, timesteps, hybrid_loss_table(schedule), weights,
                                  prediction=prediction, reduction=reduction, return_terms=return_terms)


def _fake(model_output, x_start, noise, timesteps, table, weights, prediction: str, reduction: str,
          compute_grad: bool):
    torch._check(model_output.dim() >= 2, lambda: "hybrid_loss: model_output must be (batch, 2·channels, ...)")
    torch._check(x_start.shape == noise.shape, lambda: "hybrid_loss: x_start and noise shapes differ")
    torch._check(timesteps.dim() == 1 and timesteps.shape[0] == model_output.shape[0],
                 lambda: "hybrid_loss: timesteps length")
    torch._check(table.dim() == 2 and weights.dim() == 1, lambda: "hybrid_loss: table (T, 8), weights (T,)")
    dtype = accumulate_dtype(model_output.dtype)
    batch = model_output.shape[0]
    loss = model_output.new_empty((batch,) if reduction == "none" else (), dtype=dtype)
    mse = model_output.new_empty((batch,), dtype=dtype)
    vb = model_output.new_empty((batch,), dtype=dtype)
    grad = model_output.new_empty(model_output.shape) if compute_grad else model_output.new_empty((0,))
    return loss, mse, vb, grad


def _setup_context(ctx, inputs, output) -> None:
    reduction = inputs[7]
    _, mse, vb, grad = output
    ctx.mark_non_differentiable(mse, vb, grad)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_mse, _grad_vb, _grad_grad):
    (grad,) = ctx.saved_tensors
    grad_output = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        torch._check(
            grad.numel() > 0,
            lambda: "hybrid_loss: backward needs the gradient from forward; call it with compute_grad=True "
            "(biasfast.hybrid_loss does this whenever model_output requires grad)",
        )
        grad_output = scaled_gradient(grad, grad_loss, ctx.reduction)
    return grad_output, None, None, None, None, None, None, None, None


def register() -> None:
    torch.library.register_fake("biasfast::hybrid_loss")(_fake)
    torch.library.register_autograd("biasfast::hybrid_loss", _backward, setup_context=_setup_context)
    dispatch.register_triton("hybrid_loss", "biasfast.kernels.hybrid_loss", "hybrid_loss")
