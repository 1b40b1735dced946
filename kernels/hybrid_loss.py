"""The CUDA kernel of `biasfast::hybrid_loss`, in Triton: the learned-variance hybrid loss, forward and gradient
in one pass over the model output.

Same contract and formulas as the C++ kernel (csrc/cpu/hybrid_loss.cpp, whose header comment derives them),
registered as the op's CUDA kernel by biasfast/ops/hybrid_loss.py (the op's autograd formula serves both).

Two launches on a (sample, chunk) grid, each program gathering its sample's row of the coefficient table
itself (no host sync): the KL kernel (t > 0, in float32 for float32/float16/bfloat16 inputs) and the decoder
kernel (t = 0, in float64); each masks out the samples of the other branch, so a sample's elements are read
by one of them only. Per-chunk partials are combined by fixed-shape torch reductions: deterministic, no atomics.
Value checks use `torch._assert_async`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
MAX_BLOCKS_PER_CHUNK = 16
COLUMNS = 8  # biasfast.ops.hybrid_loss.TABLE_COLUMNS
SQRT_ALPHA_BAR, SQRT_ONE_MINUS, SQRT_RECIP, SQRT_RECIPM1, COEF1, COEF2, MIN_LOG, MAX_LOG = range(COLUMNS)


@triton.jit
def _series(x, c0, c1, c2, c3, c4, c5, c6, c7):
    """c0 + c1·x + … + c7·x⁷ by Horner."""
    return c0 + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * (c5 + x * (c6 + x * c7))))))


@triton.jit
def _kl_kernel(out_ptr, target_ptr, grad_ptr, mse_ptr, kl_ptr, timesteps_ptr, table_ptr, weights_ptr,
               n, num_timesteps, chunk, chunks_per_sample, grad_scale, v_scale,
               EPSILON: tl.constexpr, HAS_GRAD: tl.constexpr, ACC: tl.constexpr, SERIES_BELOW: tl.constexpr,
               BLOCK: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)  # int64: sample * n overflows int32 for large batches
    part = tl.program_id(1).to(tl.int64)
    t = tl.load(timesteps_ptr + sample).to(tl.int64)
    valid = (t >= 0) & (t < num_timesteps)
    row = table_ptr + tl.where(valid, t, 0) * 8  # never read out of bounds; the assert reports it
    coef1 = tl.load(row + 4)
    min_log = tl.load(row + 6)
    delta = tl.load(row + 7) - min_log
    diff = coef1 * tl.load(row + 3) if EPSILON else coef1
    mse_grad = (tl.where(valid, tl.load(weights_ptr + tl.where(valid, t, 0)).to(tl.float64), float("nan"))
                * grad_scale).to(ACC)
    v_grad = (delta * v_scale).to(ACC)
    half_delta = (delta * 0.5).to(ACC)
    exp_neg_min = tl.exp(-min_log).to(ACC)
    diff = diff.to(ACC)
    limit = tl.where(t != 0, n, 0)  # decoder samples (t = 0) read nothing here
    offsets = tl.arange(0, BLOCK)
    mse_acc = tl.zeros([BLOCK], dtype=ACC)
    kl_acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, chunk, BLOCK):
        index = part * chunk + start + offsets
        mask = index < limit
        p = tl.load(out_ptr + sample * 2 * n + index, mask=mask, other=0.0).to(ACC)
        v = tl.load(out_ptr + sample * 2 * n + n + index, mask=mask, other=0.0).to(ACC)
        q = tl.load(target_ptr + sample * n + index, mask=mask, other=0.0).to(ACC)
        e = p - q
        x = (v + 1.0) * half_delta
        ex = tl.exp(-x)
        small = tl.abs(x) < SERIES_BELOW  # x − 1 + e^{−x}, 1 − e^{−x} by their series where the direct forms cancel
        f_series = x * x * _series(x, 0.5, -1.0 / 6, 1.0 / 24, -1.0 / 120, 1.0 / 720, -1.0 / 5040, 1.0 / 40320,
                                   -1.0 / 362880)
        g_series = x * _series(x, 1.0, -0.5, 1.0 / 6, -1.0 / 24, 1.0 / 120, -1.0 / 720, 1.0 / 5040, -1.0 / 40320)
        f = tl.where(small, f_series, (x - 1.0) + ex)
        g = tl.where(small, g_series, 1.0 - ex)
        d = diff * e
        d2 = d * d * exp_neg_min * ex
        mse_acc += tl.where(mask, e * e, 0.0)
        kl_acc += tl.where(mask, f + d2, 0.0)
        if HAS_GRAD:
            element_ty = grad_ptr.dtype.element_ty
            tl.store(grad_ptr + sample * 2 * n + index, (mse_grad * e).to(element_ty), mask=mask)
            tl.store(grad_ptr + sample * 2 * n + n + index, (v_grad * (g - d2)).to(element_ty), mask=mask)
    tl.store(mse_ptr + sample * chunks_per_sample + part, tl.sum(mse_acc, axis=0))
    tl.store(kl_ptr + sample * chunks_per_sample + part, tl.sum(kl_acc, axis=0))


@triton.jit
def _approx_cdf(y):
    """guided-diffusion's approx_standard_normal_cdf and its derivative, in float64 (tanh through exp)."""
    k = 0.79788456080286535588
    th = 1.0 - 2.0 / (tl.exp(2.0 * k * (y + 0.044715 * y * y * y)) + 1.0)
    return 0.5 * (1.0 + th), 0.5 * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * y * y)


@triton.jit
def _decoder_kernel(out_ptr, x_start_ptr, noise_ptr, grad_ptr, mse_ptr, nll_ptr, timesteps_ptr, table_ptr,
                    weights_ptr, n, num_timesteps, chunk, chunks_per_sample, grad_scale, v_scale,
                    EPSILON: tl.constexpr, HAS_GRAD: tl.constexpr, VIA_FLOAT32: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    t = tl.load(timesteps_ptr + sample).to(tl.int64)
    valid = (t >= 0) & (t < num_timesteps)
    row = table_ptr + tl.where(valid, t, 0) * 8
    sqrt_alpha_bar = tl.load(row + 0)
    sqrt_one_minus = tl.load(row + 1)
    sqrt_recip = tl.load(row + 2)
    sqrt_recipm1 = tl.load(row + 3)
    coef1 = tl.load(row + 4)
    coef2 = tl.load(row + 5)
    min_log = tl.load(row + 6)
    max_log = tl.load(row + 7)
    mse_grad = tl.where(valid, tl.load(weights_ptr + tl.where(valid, t, 0)).to(tl.float64), float("nan")) * grad_scale
    v_grad = (max_log - min_log) * v_scale
    limit = tl.where(t == 0, n, 0)  # KL samples (t > 0) read nothing here
    offsets = tl.arange(0, BLOCK)
    mse_acc = tl.zeros([BLOCK], dtype=tl.float64)
    nll_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, chunk, BLOCK):
        index = part * chunk + start + offsets
        mask = index < limit
        p = tl.load(out_ptr + sample * 2 * n + index, mask=mask, other=0.0).to(tl.float64)
        v = tl.load(out_ptr + sample * 2 * n + n + index, mask=mask, other=0.0).to(tl.float64)
        x0 = tl.load(x_start_ptr + sample * n + index, mask=mask, other=0.0).to(tl.float64)
        eps = tl.load(noise_ptr + sample * n + index, mask=mask, other=0.0).to(tl.float64)
        err = p - eps if EPSILON else p - x0
        x_t = sqrt_alpha_bar * x0 + sqrt_one_minus * eps
        x_hat = sqrt_recip * x_t - sqrt_recipm1 * p if EPSILON else p
        mean = coef1 * x_hat + coef2 * x_t
        frac = (v + 1.0) / 2.0
        log_scale = 0.5 * (frac * max_log + (1.0 - frac) * min_log)
        inv_stdv = tl.exp(-log_scale)
        plus_in = inv_stdv * (x0 - mean + 1.0 / 255.0)
        min_in = inv_stdv * (x0 - mean - 1.0 / 255.0)
        cdf_plus, pdf_plus = _approx_cdf(plus_in)
        cdf_min, pdf_min = _approx_cdf(min_in)
        tail = 1.0 - cdf_min
        delta = cdf_plus - cdf_min
        # d plus_in / d log_scale = −plus_in (likewise min_in); a clamped log has zero gradient
        left = x0 < -0.999
        right = x0 > 0.999
        argument = tl.where(left, cdf_plus, tl.where(right, tail, delta))
        dargument = tl.where(left, -pdf_plus * plus_in, tl.where(right, pdf_min * min_in,
                                                                  -pdf_plus * plus_in + pdf_min * min_in))
        clamped = argument <= 1e-12
        log_prob = tl.log(tl.where(clamped, 1e-12, argument))
        dlog = tl.where(clamped, 0.0, dargument / tl.where(clamped, 1.0, argument))
        mse_acc += tl.where(mask, err * err, 0.0)
        nll_acc += tl.where(mask, -log_prob, 0.0)
        if HAS_GRAD:
            grad_p = mse_grad * err
            grad_v = -v_grad * dlog
            if VIA_FLOAT32:  # float64 → bfloat16 in one cast is wrong under the Triton interpreter (integer cast)
                grad_p = grad_p.to(tl.float32)
                grad_v = grad_v.to(tl.float32)
            element_ty = grad_ptr.dtype.element_ty
            tl.store(grad_ptr + sample * 2 * n + index, grad_p.to(element_ty), mask=mask)
            tl.store(grad_ptr + sample * 2 * n + n + index, grad_v.to(element_ty), mask=mask)
    tl.store(mse_ptr + sample * chunks_per_sample + part, tl.sum(mse_acc, axis=0))
    tl.store(nll_ptr + sample * chunks_per_sample + part, tl.sum(nll_acc, axis=0))


def hybrid_loss(
    model_output: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    table: torch.Tensor, weights: torch.Tensor, prediction: str, reduction: str, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if prediction not in ("epsilon", "sample"):
        raise ValueError(f"prediction: expected 'epsilon' or 'sample', got {prediction!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    batch = model_output.shape[0]
    n = x_start.numel() // batch
    num_timesteps = table.shape[0]
    torch._assert_async(((timesteps >= 0) & (timesteps < num_timesteps)).all(),
                        f"timesteps: entries must lie in [0, {num_timesteps}) (the schedule's timesteps)")
    torch._assert_async((torch.isfinite(weights) & (weights >= 0)).all(),
                        "weights: entries must be finite and non-negative")
    torch._assert_async(torch.isfinite(table).all(),
                        "table: entries must be finite (a schedule needs 0 < alphas_cumprod < 1 everywhere)")
    acc_dtype = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    out, x0, eps = model_output.contiguous(), x_start.contiguous(), noise.contiguous()
    table, weights = table.to(torch.float64).contiguous(), weights.contiguous()
    chunk = BLOCK * min(MAX_BLOCKS_PER_CHUNK, triton.cdiv(n, BLOCK))
    chunks_per_sample = triton.cdiv(n, chunk)
    kl_mse = torch.empty((batch, chunks_per_sample), dtype=acc_dtype, device=out.device)
    kl_sum = torch.empty_like(kl_mse)
    decoder_mse = torch.empty((batch, chunks_per_sample), dtype=torch.float64, device=out.device)
    decoder_nll = torch.empty_like(decoder_mse)
    grad = torch.empty_like(out) if compute_grad else out.new_empty((0,))
    scale = 1.0 / batch if reduction == "mean" else 1.0
    vb_scale = (num_timesteps / 1000.0) / (n * math.log(2.0))
    epsilon = prediction == "epsilon"
    grid = (batch, chunks_per_sample)
    common = dict(EPSILON=epsilon, HAS_GRAD=compute_grad, BLOCK=BLOCK)
    _kl_kernel[grid](out, eps if epsilon else x0, grad if compute_grad else out, kl_mse, kl_sum, timesteps, table,
                     weights, n, num_timesteps, chunk, chunks_per_sample, 2.0 * scale / n, scale * vb_scale / 4.0,
                     ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
                     # the 8-term series is exact to float32 below 0.5, to float64 below 0.05
                     SERIES_BELOW=0.05 if acc_dtype == torch.float64 else 0.5, **common)
    _decoder_kernel[grid](out, x0, eps, grad if compute_grad else out, decoder_mse, decoder_nll, timesteps, table,
                          weights, n, num_timesteps, chunk, chunks_per_sample, 2.0 * scale / n,
                          scale * vb_scale / 4.0, VIA_FLOAT32=out.dtype != torch.float64, **common)
    mse = (kl_mse.sum(dim=1).double() + decoder_mse.sum(dim=1)) / n
    vb = (0.5 * kl_sum.sum(dim=1).double() + decoder_nll.sum(dim=1)) * vb_scale
    per_sample = weights.to(torch.float64)[timesteps.clamp(0, num_timesteps - 1)] * mse + vb
    torch._assert_async(torch.isfinite(per_sample).all(),
                        "model_output: the loss is not finite: NaN/Inf in the variance channels v (v must be "
                        "finite) or in the prediction, x_start or noise")
    loss = per_sample if reduction == "none" else per_sample.sum() * scale
    return loss.to(acc_dtype), mse.to(acc_dtype), vb.to(acc_dtype), grad
