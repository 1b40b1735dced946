"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

import torch


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by direct differences, (n, d) x (m, d) -> (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


# ---- SNR-weighted loss (issue 5) ----


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over non-batch dims of (pred − target)², in float32 (float64 for float64 inputs), as diffusers does."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


def snr_weighted_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """reduce_b( weights[timesteps[b]] · mean_i (pred_bi − target_bi)² ), reduction "mean", "sum" or "none"."""
    mse = per_sample_mse(pred, target)
    weighted = weights.to(mse.dtype)[timesteps] * mse
    if reduction == "none":
        return weighted
    return weighted.sum() if reduction == "sum" else weighted.mean()
# ---- sampling (issue 6) ----

def sampler_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    method: str = "ddim",
    prediction: str = "epsilon",
    eta: float = 0.0,
    guidance_scale: float | None = None,
    uncond_output: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM (fixed_small) or DDIM step as diffusers' `DDPMScheduler.step` / `DDIMScheduler.step` write it,
    with per-sample t, t_prev (B,) (t_prev = -1: ᾱ_prev = 1) and CFG ε = ε_u + s·(ε_c − ε_u). Returns (x_prev, x̂0)."""
    view = (-1,) + (1,) * (x_t.dim() - 1)
    table = alphas_cumprod.to(x_t.device, x_t.dtype)
    alpha = table[t].view(view)
    alpha_prev = torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones_like(table[t_prev])).view(view)
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    if guidance_scale is not None:
        model_output = uncond_output + guidance_scale * (model_output - uncond_output)
    if prediction == "epsilon":
        x0 = (x_t - beta**0.5 * model_output) / alpha**0.5
        eps = model_output
    elif prediction == "sample":
        x0 = model_output
        eps = (x_t - alpha**0.5 * x0) / beta**0.5
    elif prediction == "v_prediction":
        x0 = alpha**0.5 * x_t - beta**0.5 * model_output
        eps = alpha**0.5 * model_output + beta**0.5 * x_t
    else:
        raise ValueError(f"prediction: unknown {prediction!r}")
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    if method == "ddim":
        std = eta * ((beta_prev / beta) * (1 - alpha / alpha_prev)) ** 0.5
        x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + std * noise
    elif method == "ddpm":
        step_alpha = alpha / alpha_prev
        step_beta = 1 - step_alpha
        x_prev = (alpha_prev**0.5 * step_beta / beta) * x0 + (step_alpha**0.5 * beta_prev / beta) * x_t
        variance = (beta_prev / beta * step_beta).clamp(min=1e-20)
        x_prev = x_prev + torch.where(t.view(view) > 0, variance**0.5, torch.zeros_like(variance)) * noise
    else:
        raise ValueError(f"method: unknown {method!r}")
    return x_prev, x0
