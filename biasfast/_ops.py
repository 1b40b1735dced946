"""Fake (meta) kernels and autograd formulas of the compiled operators.

Fakes let `torch.compile(fullgraph=True)` and `torch.export` trace through biasfast ops;
they are registered only when the extension loaded, so a broken build still imports.
"""

from __future__ import annotations

import torch

from biasfast import _extension


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sqdist_fake(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "sqdist: x and y must be 2-D")
    torch._check(x.shape[1] == y.shape[1], lambda: "sqdist: feature sizes of x and y differ")
    return x.new_empty((x.shape[0], y.shape[0]), dtype=_accumulate_dtype(x.dtype))


def _sqdist_setup_context(ctx, inputs, output) -> None:
    x, y = inputs
    ctx.save_for_backward(x, y)


def _sqdist_backward(ctx, grad: torch.Tensor):
    # d/dx_i sum_j g_ij |x_i - y_j|^2 = 2 (x_i sum_j g_ij - sum_j g_ij y_j); symmetric for y.
    x, y = ctx.saved_tensors
    grad_x = grad_y = None
    if ctx.needs_input_grad[0]:
        grad_x = 2 * (x * grad.sum(1, keepdim=True) - grad @ y.to(grad.dtype)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_y = 2 * (y * grad.sum(0).unsqueeze(1) - grad.t() @ x.to(grad.dtype)).to(y.dtype)
    return grad_x, grad_y


def register() -> None:
    torch.library.register_fake("biasfast::sqdist")(_sqdist_fake)
    torch.library.register_autograd("biasfast::sqdist", _sqdist_backward, setup_context=_sqdist_setup_context)


if _extension.available():
    register()


# ---- SNR-weighted loss (issue 5): biasfast::snr_loss (C++, CPU) and biasfast::snr_loss_triton share these ----
# The forward already returns d loss / d pred (Liger-Kernel style); backward only rescales it.


def _snr_loss_fake(pred, target, timesteps, weights, reduction: str, compute_grad: bool):
    torch._check(pred.dim() >= 1, lambda: "snr_loss: pred must have a batch dimension")
    torch._check(target.shape == pred.shape, lambda: "snr_loss: target and pred shapes differ")
    torch._check(timesteps.dim() == 1 and timesteps.shape[0] == pred.shape[0], lambda: "snr_loss: timesteps length")
    torch._check(weights.dim() == 1, lambda: "snr_loss: weights must be 1-D")
    dtype = _accumulate_dtype(pred.dtype)
    batch = pred.shape[0]
    loss = pred.new_empty((batch,) if reduction == "none" else (), dtype=dtype)
    mse = pred.new_empty((batch,), dtype=dtype)
    grad = pred.new_empty(pred.shape) if compute_grad else pred.new_empty((0,))
    return loss, mse, grad


def snr_loss_setup_context(ctx, inputs, output) -> None:
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


def _scaled_gradient(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        per_sample = grad_loss.view(-1, *([1] * (grad.dim() - 1)))
        return (grad * per_sample).to(grad.dtype)
    return grad if _is_one(grad_loss) else grad * grad_loss  # a 0-d factor keeps grad's dtype


def snr_loss_backward(ctx, grad_loss, _grad_mse, _grad_grad):
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
        scaled = _scaled_gradient(grad, grad_loss, ctx.reduction)
        grad_pred = scaled if need_pred else None
        grad_target = -scaled if need_target else None
    if need_weights:
        shape, dtype = ctx.weights_meta
        contribution = (grad_loss * ctx.scale * mse).to(dtype)
        # A one-hot matmul instead of index_add_: no atomics, so the same bits on every run on CUDA too.
        one_hot = torch.nn.functional.one_hot(timesteps.long(), shape[0]).to(dtype)
        grad_weights = one_hot.t() @ contribution
    return grad_pred, grad_target, None, grad_weights, None, None


def register_snr_loss() -> None:
    torch.library.register_fake("biasfast::snr_loss")(_snr_loss_fake)
    torch.library.register_autograd("biasfast::snr_loss", snr_loss_backward, setup_context=snr_loss_setup_context)


if _extension.available():
    register_snr_loss()


# ---- sampling (issue 6): fused DDPM/DDIM/CFG step; sampling is inference-only, so no autograd ----

def _sampler_step_fake(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
                       guidance_scale, clip_sample, return_x0):
    torch._check(model_output.shape == x_t.shape, lambda: "sampler_step: model_output must have x_t's shape")
    x_prev = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x_prev) if return_x0 else x_t.new_empty((0,))
    return x_prev, x0


def _sampler_step_out_fake(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction,
                           eta, guidance_scale, clip_sample, out, x0_out):
    torch._check(out.shape == x_t.shape, lambda: "sampler_step_out: out must have x_t's shape")


def register_sampling() -> None:
    torch.library.register_fake("biasfast::sampler_step")(_sampler_step_fake)
    torch.library.register_fake("biasfast::sampler_step.out")(_sampler_step_out_fake)


if _extension.available():
    register_sampling()
# ---- hierarchical model: tree belief propagation (issue 8) ----


def _tree_bp_fake(evidence, scale, grammar, top):
    torch._check(evidence.dim() == 3, lambda: "tree_bp: evidence must be (batch, leaves, q)")
    torch._check(scale.dim() == 1 and scale.shape[0] == evidence.shape[0], lambda: "tree_bp: scale must be (batch,)")
    torch._check(grammar.dim() == 3 and top.dim() == 3, lambda: "tree_bp: grammar and top must be 3-D")
    dtype = _accumulate_dtype(evidence.dtype)
    return evidence.new_empty(evidence.shape, dtype=dtype), evidence.new_empty((evidence.shape[0],), dtype=dtype)


if _extension.available():
    torch.library.register_fake("biasfast::tree_bp")(_tree_bp_fake)
# ---- exact k-nearest neighbours (issue 3) ----


def _knn_fake(query, ref, k, metric, index_offset, exclude_self, workspace_mb):
    torch._check(query.dim() == 2 and ref.dim() == 2, lambda: "knn: query and ref must be 2-D")
    torch._check(query.shape[1] == ref.shape[1], lambda: "knn: feature sizes of query and ref differ")
    dtype = torch.float64 if torch.float64 in (query.dtype, ref.dtype) else torch.float32
    return query.new_empty((query.shape[0], k), dtype=dtype), query.new_empty((query.shape[0], k), dtype=torch.int64)


def _knn_hamming_fake(query, ref, k, index_offset, exclude_self):
    torch._check(query.dim() == 2 and ref.dim() == 2, lambda: "knn_hamming: query and ref must be 2-D")
    torch._check(query.shape[1] == ref.shape[1], lambda: "knn_hamming: sequence lengths of query and ref differ")
    rows = query.shape[0]
    return query.new_empty((rows, k), dtype=torch.float32), query.new_empty((rows, k), dtype=torch.int64)


def register_knn() -> None:
    torch.library.register_fake("biasfast::knn")(_knn_fake)
    torch.library.register_fake("biasfast::knn_hamming")(_knn_hamming_fake)


if _extension.available():
    register_knn()


# ---- memorization metrics (issue: bias_score) ----


def _row_hash_fake(rows: torch.Tensor) -> torch.Tensor:
    torch._check(rows.dim() == 2, lambda: "row_hash: rows must be 2-D")
    return rows.new_empty((rows.shape[0],), dtype=torch.int64)


def register_row_hash() -> None:
    # An integer hash has no gradient; no autograd formula is registered.
    torch.library.register_fake("biasfast::row_hash")(_row_hash_fake)


if _extension.available():
    register_row_hash()
