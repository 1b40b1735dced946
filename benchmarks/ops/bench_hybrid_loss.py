"""Fused learned-variance hybrid loss, forward + backward: biasfast vs the reference (eager and torch.compile'd).

The reference is guided-diffusion's computation in float32 (`reference.hybrid_loss` on float32 inputs: tables
gathered as float32, x_t formed, the frozen mean, normal_kl / decoder NLL, autograd backward). Shapes are those
of bench_snr_loss.py with 2C model-output channels.

The memory floor of the fused loss is reading model_output (2C channels) and the target (C) once and writing
the gradient (2C) once, 5 C-sized passes: `test_copy_bandwidth` times a model_output-sized `Tensor.copy_` (one
read + one write, 4 passes) in the same run, so floor = 1.25 × that copy time.
"""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from benchmarks.conftest import shapes

SHAPES = shapes(full=[(128, 3, 32, 32), (64, 3, 64, 64), (16, 4, 128, 128), (32, 4, 256, 256)], quick=[(3, 2, 5, 7)])
PROVIDERS = ["biasfast", "reference", "compiled"]
SCHEDULE = biasfast.NoiseSchedule("linear", 1000)
WEIGHTS = biasfast.weighting("debias", SCHEDULE).float()
CRITERION = biasfast.nn.HybridLoss(SCHEDULE, "debias")


def _label(shape) -> str:
    return "x".join(map(str, shape))


def _reference(model_output, x_start, noise, timesteps):
    return reference.hybrid_loss(model_output, x_start, noise, timesteps, SCHEDULE.alphas_cumprod, WEIGHTS)


LOSSES = {"biasfast": CRITERION, "reference": _reference, "compiled": torch.compile(_reference)}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_hybrid_loss_forward_backward(bench, benchmark, provider, shape):
    benchmark.group = f"hybrid_loss fwd+bwd {_label(shape)}"
    batch, channels = shape[:2]
    model_output = torch.randn((batch, 2 * channels, *shape[2:])).requires_grad_()
    x_start = torch.rand(shape) * 2 - 1
    noise = torch.randn(shape)
    timesteps = torch.randint(1, 1000, (batch,))
    timesteps[0] = 0  # one decoder-NLL sample per batch, as t ~ U{0..T−1} gives about every 1000th
    loss_fn = LOSSES[provider]

    def step():  # the gradient is dropped at once, as a model's backward consumes it (so buffers can be recycled)
        torch.autograd.grad(loss_fn(model_output, x_start, noise, timesteps), model_output)

    bench(step, provider=provider, shape=_label(shape), rounds=20)


@pytest.mark.parametrize("shape", SHAPES[-1:])
def test_copy_bandwidth(bench, benchmark, shape):
    benchmark.group = f"hybrid_loss fwd+bwd {_label(shape)}"
    batch, channels = shape[:2]
    source = torch.randn((batch, 2 * channels, *shape[2:]))
    destination = torch.empty_like(source)
    benchmark.extra_info["bytes"] = 2 * source.numel() * source.element_size()
    bench(lambda: destination.copy_(source), provider="copy_", shape=_label(shape), rounds=20)
