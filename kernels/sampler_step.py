"""The CUDA kernel of `biasfast::sampler_step` (both overloads), in Triton: the fused DDPM/DDIM/CFG step.

Same schema and update as the C++ kernel (csrc/cpu/sampler_step.cpp), registered as the op's CUDA kernel by
biasfast/ops/sampler_step.py; each program owns
a block of one sample, gathers ᾱ_t, ᾱ_{t'} from the device table with that sample's timesteps, computes
the coefficients in float64 and streams x_t, model outputs and noise once. No host synchronisation. With a
learned variance (B, 2C, ...) model outputs are read in two halves: the prediction, and the variance
interpolation v that sets the DDPM step's σ = exp(h0 + h1·v) per element.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from biasfast._core.constants import PREDICTIONS, SAMPLER_METHODS, VARIANCES

METHOD_CODES = {name: code for code, name in enumerate(SAMPLER_METHODS)}
PREDICTION_CODES = {name: code for code, name in enumerate(PREDICTIONS)}
BLOCK = 1024


@triton.jit
def _load(ptr, offsets, mask, DOUBLE: tl.constexpr):
    value = tl.load(ptr + offsets, mask=mask, other=0.0)
    if DOUBLE:
        value = value.to(tl.float64)
    else:
        value = value.to(tl.float32)
    return value


@triton.jit
def _sampler_step_kernel(x_ptr, cond_ptr, uncond_ptr, noise_ptr, out_ptr, x0_ptr, t_ptr, t_prev_ptr, t_stride,
                         t_prev_stride, table_ptr, final_ptr, row, eta, scale, clip, DDIM: tl.constexpr,
                         PREDICTION: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, NOISY: tl.constexpr,
                         WRITE_X0: tl.constexpr, DOUBLE: tl.constexpr, HALVES: tl.constexpr,
                         LEARNED: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    now = tl.load(t_ptr + sample * t_stride)
    prev = tl.load(t_prev_ptr + sample * t_prev_stride)
    alpha = tl.load(table_ptr + now).to(tl.float64)
    alpha_prev = tl.where(prev >= 0, tl.load(table_ptr + tl.maximum(prev, 0)), tl.load(final_ptr)).to(tl.float64)
    beta_bar = 1.0 - alpha
    beta_bar_prev = 1.0 - alpha_prev
    root_alpha = tl.sqrt(alpha)
    root_beta_bar = tl.sqrt(beta_bar)
    zero = alpha * 0.0
    # x̂0 = a0·x + b0·g, ε̂ = a1·x + b1·g (see csrc/sampler_coefficients.h)
    if PREDICTION == 0:
        a0, b0, a1, b1 = 1.0 / root_alpha, -root_beta_bar / root_alpha, zero, zero + 1.0
    elif PREDICTION == 1:
        a0, b0, a1, b1 = zero, zero + 1.0, 1.0 / root_beta_bar, -root_alpha / root_beta_bar
    else:
        a0, b0, a1, b1 = root_alpha, -root_beta_bar, root_beta_bar, root_alpha
    # x_{t'} = p0·x̂0 + p1·ε̂ + p2·x + σ·z
    if DDIM:
        sigma = eta * tl.sqrt((beta_bar_prev / beta_bar) * (1.0 - alpha / alpha_prev))
        p0, p1, p2 = tl.sqrt(alpha_prev), tl.sqrt(tl.maximum(1.0 - alpha_prev - sigma * sigma, 0.0)), zero
    else:
        step_alpha = alpha / alpha_prev
        step_beta = 1.0 - step_alpha
        p0, p1, p2 = tl.sqrt(alpha_prev) * step_beta / beta_bar, zero, tl.sqrt(step_alpha) * beta_bar_prev / beta_bar
        posterior = tl.maximum(beta_bar_prev / beta_bar * step_beta, 1e-20)
        sigma = tl.where(now > 0, tl.sqrt(posterior), 0.0)
        # LEARNED_RANGE: log σ² = frac·log β' + (1 − frac)·log β̃', frac = (v + 1)/2, i.e. σ = exp(h0 + h1·v)
        max_log, min_log = tl.log(step_beta), tl.log(posterior)
        h0 = tl.where(now > 0, 0.25 * (max_log + min_log), -float("inf"))
        h1 = tl.where(now > 0, 0.25 * (max_log - min_log), 0.0)

    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < row
    model_offsets = sample.to(tl.int64) * (2 * row if HALVES else row) + offsets
    offsets = sample.to(tl.int64) * row + offsets
    x = _load(x_ptr, offsets, mask, DOUBLE)
    g = _load(cond_ptr, model_offsets, mask, DOUBLE)
    if GUIDED:
        u = _load(uncond_ptr, model_offsets, mask, DOUBLE)
        g = u + scale * (g - u)  # scalars stay weakly typed: x's precision
    x0 = tl.fma(b0.to(x.dtype), g, a0.to(x.dtype) * x)
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    eps = tl.fma(b1.to(x.dtype), g, a1.to(x.dtype) * x)
    result = tl.fma(p0.to(x.dtype), x0, tl.fma(p1.to(x.dtype), eps, p2.to(x.dtype) * x))
    if NOISY:
        if LEARNED:
            v = _load(cond_ptr, model_offsets + row, mask, DOUBLE)
            scale_z = tl.exp(tl.fma(h1.to(x.dtype), v, h0.to(x.dtype)))
        else:
            scale_z = sigma.to(x.dtype)
        result = tl.fma(scale_z, _load(noise_ptr, offsets, mask, DOUBLE), result)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _check_options(method: str, prediction: str, eta: float, guidance_scale: float | None,
                   uncond_output: torch.Tensor | None, noise: torch.Tensor | None, variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"variance: unknown {variance!r}; expected one of {VARIANCES}")
    if method not in METHOD_CODES:
        raise ValueError(f"method: unknown {method!r}; expected one of {SAMPLER_METHODS}")
    if prediction not in PREDICTION_CODES:
        raise ValueError(f"prediction: unknown {prediction!r}; expected one of {PREDICTIONS}")
    if (guidance_scale is None) != (uncond_output is None):
        raise ValueError("uncond_output: give it together with guidance_scale")
    if noise is None and (method == "ddpm" or eta > 0):
        raise ValueError("noise: required when method is 'ddpm' or eta > 0")


@functools.lru_cache(maxsize=16)
def _final_alpha_tensor(value: float, device: torch.device) -> torch.Tensor:
    """The final step's ᾱ as a read-only one-element float64 tensor, made once per (value, device): a sampling
    loop then allocates nothing per step (and stays capturable in a CUDA graph)."""
    return torch.full((1,), value, dtype=torch.float64, device=device)


def _launch(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
            guidance_scale, clip_sample, out, x0_out, variance, final_alpha_cumprod) -> None:
    """Write x_{t'} into `out` (contiguous; may be x_t itself) and x̂0 into `x0_out` unless it is empty.
    The final step's ᾱ travels as a float64 tensor: a Triton float argument would round it to float32."""
    _check_options(method, prediction, eta, guidance_scale, uncond_output, noise, variance)
    x = x_t.contiguous()
    if x.numel() == 0:
        return
    batch = x.shape[0]
    row = x.numel() // batch
    cond = model_output.contiguous()
    uncond = cond if uncond_output is None else uncond_output.contiguous()
    z = x if noise is None else noise.contiguous()
    write_x0 = x0_out.numel() > 0
    final = _final_alpha_tensor(float(final_alpha_cumprod), x.device)
    grid = (batch, triton.cdiv(row, BLOCK))
    _sampler_step_kernel[grid](
        x, cond, uncond, z, out, x0_out if write_x0 else out, t, t_prev, t.stride(0), t_prev.stride(0),
        alphas_cumprod, final, row, float(eta), float(guidance_scale or 1.0), float(clip_sample or 0.0),
        DDIM=method == "ddim", PREDICTION=PREDICTION_CODES[prediction], GUIDED=uncond_output is not None,
        CLIP=clip_sample is not None, NOISY=noise is not None, WRITE_X0=write_x0,
        DOUBLE=x.dtype == torch.float64, HALVES=variance == "learned_range",
        LEARNED=variance == "learned_range" and method == "ddpm", BLOCK=BLOCK)


def sampler_step(x_t: torch.Tensor, model_output: torch.Tensor, uncond_output: torch.Tensor | None,
                        noise: torch.Tensor | None, t: torch.Tensor, t_prev: torch.Tensor,
                        alphas_cumprod: torch.Tensor, method: str, prediction: str, eta: float,
                        guidance_scale: float | None, clip_sample: float | None,
                        return_x0: bool, variance: str = "fixed_small",
                        final_alpha_cumprod: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(out) if return_x0 else x_t.new_empty((0,))
    _launch(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
            guidance_scale, clip_sample, out, x0, variance, final_alpha_cumprod)
    return out, x0


def sampler_step_out(x_t: torch.Tensor, model_output: torch.Tensor, uncond_output: torch.Tensor | None,
                            noise: torch.Tensor | None, t: torch.Tensor, t_prev: torch.Tensor,
                            alphas_cumprod: torch.Tensor, method: str, prediction: str, eta: float,
                            guidance_scale: float | None, clip_sample: float | None, out: torch.Tensor,
                            x0_out: torch.Tensor, variance: str = "fixed_small",
                            final_alpha_cumprod: float = 1.0) -> None:
    _launch(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
            guidance_scale, clip_sample, out, x0_out, variance, final_alpha_cumprod)

