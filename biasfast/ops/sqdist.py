"""`biasfast::sqdist`: exact squared L2 distances by direct differences (no norm expansion), differentiable."""

from __future__ import annotations

import torch

from biasfast._core import dispatch
from biasfast._core.checks import check_floating, check_same_device, check_tensor
from biasfast._core.extension import accumulate_dtype


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 distances between the rows of x (n, d) and y (m, d).

    Returns float32 (float64 for float64 inputs); differentiable in x and y.
    """
    check_tensor(x, "x")
    check_tensor(y, "y")
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (rows, features) tensor, got shape {tuple(t.shape)}")
        check_floating(t, name)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y: feature size {y.shape[1]} does not match x's {x.shape[1]}")
    check_same_device({"x": x, "y": y})
    operator = dispatch.op("sqdist")
    dispatch.require_kernel("sqdist", x, "x")
    return operator(x, y)


def _fake(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "sqdist: x and y must be 2-D")
    torch._check(x.shape[1] == y.shape[1], lambda: "sqdist: feature sizes of x and y differ")
    return x.new_empty((x.shape[0], y.shape[0]), dtype=accumulate_dtype(x.dtype))


def _setup_context(ctx, inputs, output) -> None:
    x, y = inputs
    ctx.save_for_backward(x, y)


def _backward(ctx, grad: torch.Tensor):
    # d/dx_i sum_j g_ij |x_i - y_j|^2 = 2 (x_i sum_j g_ij - sum_j g_ij y_j); symmetric for y.
    x, y = ctx.saved_tensors
    grad_x = grad_y = None
    if ctx.needs_input_grad[0]:
        grad_x = 2 * (x * grad.sum(1, keepdim=True) - grad @ y.to(grad.dtype)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_y = 2 * (y * grad.sum(0).unsqueeze(1) - grad.t() @ x.to(grad.dtype)).to(y.dtype)
    return grad_x, grad_y


def register() -> None:
    torch.library.register_fake("biasfast::sqdist")(_fake)
    torch.library.register_autograd("biasfast::sqdist", _backward, setup_context=_setup_context)
