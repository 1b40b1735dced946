"""Fused SNR-weighted loss, forward + backward: biasfast vs the reference (eager and torch.compile'd).

The memory floor of the fused loss is reading pred and target once and writing the gradient once:
`test_copy_bandwidth` times a pred-sized `Tensor.copy_` (one read + one write) in the same run, so
floor = 1.5 x that copy time.
"""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from benchmarks.conftest import shapes

SHAPES = shapes(full=[(128, 3, 32, 32), (64, 3, 64, 64), (16, 4, 128, 128), (32, 4, 256, 256)], quick=[(3, 2, 5, 7)])
PROVIDERS = ["biasfast", "reference", "compiled"]
WEIGHTS = biasfast.weighting("debias", biasfast.NoiseSchedule("linear", 1000)).float()


def _label(shape) -> str:
    return "x".join(map(str, shape))


def _compiled_reference(pred, target, timesteps, weights):
    return reference.snr_loss(pred, target, timesteps, weights)


LOSSES = {
    "biasfast": biasfast.snr_weighted_loss,
    "reference": reference.snr_loss,
    "compiled": torch.compile(_compiled_reference),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_snr_loss_forward_backward(bench, benchmark, provider, shape):
    benchmark.group = f"snr_loss fwd+bwd {_label(shape)}"
    pred = torch.randn(shape, requires_grad=True)
    target = torch.randn(shape)
    timesteps = torch.randint(0, 1000, (shape[0],))
    loss_fn = LOSSES[provider]

    def step():  # the gradient is dropped at once, as a model's backward consumes it (so buffers can be recycled)
        torch.autograd.grad(loss_fn(pred, target, timesteps, WEIGHTS), pred)

    bench(step, provider=provider, shape=_label(shape), rounds=20)


@pytest.mark.parametrize("shape", SHAPES[-1:])
def test_copy_bandwidth(bench, benchmark, shape):
    benchmark.group = f"snr_loss fwd+bwd {_label(shape)}"
    source = torch.randn(shape)
    destination = torch.empty(shape)
    benchmark.extra_info["bytes"] = 2 * source.numel() * source.element_size()
    bench(lambda: destination.copy_(source), provider="copy_", shape=_label(shape), rounds=20)
