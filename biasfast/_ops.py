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
    torch.library.register_fake("biasfast::sampler_step_out")(_sampler_step_out_fake)


if _extension.available():
    register_sampling()
