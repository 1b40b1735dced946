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
