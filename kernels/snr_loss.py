"""The CUDA kernel of `biasfast::snr_loss`, in Triton: the fused SNR-weighted MSE, forward and gradient in one pass.

Same contract as the C++ kernel (csrc/cpu/snr_loss.cpp), registered as the op's CUDA kernel by
biasfast/ops/snr_loss.py (the op's autograd formula, registered once there, serves both).

Grid (sample, chunk): each program gathers w[t_b] itself, reads its chunk of pred and target once,
writes the finished gradient 2·w·scale·(p − t)/N and one float32 partial sum. Partials are combined by a
fixed-shape torch reduction, so results are deterministic (no atomics). Value checks use
`torch._assert_async`: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
MAX_BLOCKS_PER_CHUNK = 16


@triton.jit
def _snr_loss_kernel(pred_ptr, target_ptr, grad_ptr, partial_ptr, timesteps_ptr, weights_ptr,
                     n, num_weights, chunk, chunks_per_sample, grad_scale,
                     HAS_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(0).to(tl.int64)  # int64: sample * n overflows int32 for large batches
    part = tl.program_id(1).to(tl.int64)
    t = tl.load(timesteps_ptr + sample).to(tl.int64)
    valid = (t >= 0) & (t < num_weights)
    w = tl.load(weights_ptr + tl.where(valid, t, 0)).to(ACC)
    coef = tl.where(valid, w, float("nan")) * grad_scale  # never read out of bounds; the assert reports it
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, chunk, BLOCK):
        index = part * chunk + start + offsets
        mask = index < n
        p = tl.load(pred_ptr + sample * n + index, mask=mask, other=0.0).to(ACC)
        q = tl.load(target_ptr + sample * n + index, mask=mask, other=0.0).to(ACC)
        d = p - q
        acc += d * d
        if HAS_GRAD:
            tl.store(grad_ptr + sample * n + index, (coef * d).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + sample * chunks_per_sample + part, tl.sum(acc, axis=0))


def snr_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor,
    reduction: str, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = pred.shape[0]
    n = pred.numel() // batch
    num_weights = weights.shape[0]
    torch._assert_async(((timesteps >= 0) & (timesteps < num_weights)).all(),
                        f"timesteps: entries must lie in [0, {num_weights}) (the weights table's length)")
    torch._assert_async((torch.isfinite(weights) & (weights >= 0)).all(),
                        "weights: entries must be finite and non-negative")
    acc_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p, q = pred.contiguous(), target.contiguous()
    chunk = BLOCK * min(MAX_BLOCKS_PER_CHUNK, triton.cdiv(n, BLOCK))
    chunks_per_sample = triton.cdiv(n, chunk)
    partial = torch.empty((batch, chunks_per_sample), dtype=acc_dtype, device=pred.device)
    grad = torch.empty_like(p) if compute_grad else p.new_empty((0,))
    scale = 1.0 / batch if reduction == "mean" else 1.0
    if batch and n:
        _snr_loss_kernel[(batch, chunks_per_sample)](
            p, q, grad if compute_grad else p, partial, timesteps, weights,
            n, num_weights, chunk, chunks_per_sample, 2.0 * scale / n,
            HAS_GRAD=compute_grad, ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=BLOCK,
        )
    mse = partial.sum(dim=1) / n
    weighted = weights.to(acc_dtype)[timesteps] * mse
    loss = weighted if reduction == "none" else weighted.sum() * scale
    return loss, mse, grad

