"""Comparison helpers: kernels against float64 references, tolerances by input dtype."""

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def assert_close_to_reference(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """Compare a kernel result with a float64 reference; `dtype` is the kernel's input dtype."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected64.double().cpu(), rtol=tol["rtol"], atol=tol["atol"] * scale
    )
