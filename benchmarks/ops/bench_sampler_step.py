"""The CFG + DDIM(eta = 1) + clip sampler step: biasfast's fused kernel vs the reference (eager and compiled).

`*_inplace` providers write x_{t'} over x_t (what a sampling loop does; no fresh output allocation, whose page
faults dominate at the large shape). `copy` times out.copy_(x) on the same size: the machine's streaming
bandwidth, from which the memory floor of the step (four tensors read, one written) is 5/2 of the copy time.
"""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from biasfast.diffusion.sampling import step
from benchmarks.conftest import shapes

SHAPES = shapes(full=[(128, 3, 32, 32), (64, 3, 64, 64), (32, 4, 256, 256)], quick=[(3, 2, 5, 7)])
PROVIDERS = ["biasfast", "reference", "compiled", "biasfast_inplace", "compiled_inplace", "copy"]
SCHEDULE = biasfast.NoiseSchedule("linear", 1000)
GUIDANCE, CLIP = 7.5, 1.0


def _reference_step(x, cond, uncond, noise, t, t_prev, table):
    return reference.sampler_step(x, cond, t, t_prev, table, eta=1.0, guidance_scale=GUIDANCE, uncond_output=uncond,
                                  noise=noise, clip_sample=CLIP)[0]


def _reference_step_inplace(x, cond, uncond, noise, t, t_prev, table):
    return x.copy_(_reference_step(x, cond, uncond, noise, t, t_prev, table))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_ddim_clip_step(bench, benchmark, provider, shape):
    benchmark.group = f"sampler step {'x'.join(map(str, shape))}"
    x, cond, uncond, noise = (torch.randn(shape) for _ in range(4))
    t = torch.randint(21, 1000, (shape[0],))
    t_prev = t - 20
    table = SCHEDULE.table("cpu", torch.float32)
    out = torch.empty_like(x)
    options = dict(eta=1.0, guidance_scale=GUIDANCE, uncond_output=uncond, noise=noise, clip_sample=CLIP)
    fn = {
        "biasfast": lambda: step(x, cond, t, t_prev, SCHEDULE, **options),
        "reference": lambda: _reference_step(x, cond, uncond, noise, t, t_prev, table),
        "compiled": lambda: compiled(x, cond, uncond, noise, t, t_prev, table),
        "biasfast_inplace": lambda: step(x, cond, t, t_prev, SCHEDULE, out=x, **options),
        "compiled_inplace": lambda: compiled_inplace(x, cond, uncond, noise, t, t_prev, table),
        "copy": lambda: out.copy_(x),
    }[provider]
    compiled = torch.compile(_reference_step)
    compiled_inplace = torch.compile(_reference_step_inplace)
    bench(fn, provider=provider, shape="x".join(map(str, shape)), rounds=20, warmup=3)


def _reference_learned_step(x, output, noise, t, t_prev, table):
    return reference.sampler_step(x, output, t, t_prev, table, method="ddpm", noise=noise, clip_sample=CLIP,
                                  variance="learned_range")[0]


@pytest.mark.parametrize("provider", ["biasfast", "biasfast_inplace", "reference", "compiled"])
@pytest.mark.parametrize("shape", SHAPES)
def test_learned_variance_ddpm_step(bench, benchmark, provider, shape):
    """DDPM with guided-diffusion's learned range: the model output (B, 2C, ...) is read in place, σ per element."""
    benchmark.group = f"learned-variance DDPM step {'x'.join(map(str, shape))}"
    x, noise = torch.randn(shape), torch.randn(shape)
    output = torch.cat([torch.randn(shape), torch.rand(shape) * 2 - 1], dim=1)
    t = torch.randint(21, 1000, (shape[0],))
    t_prev = t - 20
    table = SCHEDULE.table("cpu", torch.float32)
    options = dict(method="ddpm", noise=noise, clip_sample=CLIP, variance="learned_range")
    compiled = torch.compile(_reference_learned_step)
    fn = {
        "biasfast": lambda: step(x, output, t, t_prev, SCHEDULE, **options),
        "biasfast_inplace": lambda: step(x, output, t, t_prev, SCHEDULE, out=x, **options),
        "reference": lambda: _reference_learned_step(x, output, noise, t, t_prev, table),
        "compiled": lambda: compiled(x, output, noise, t, t_prev, table),
    }[provider]
    bench(fn, provider=provider, shape="x".join(map(str, shape)), rounds=20, warmup=3)
