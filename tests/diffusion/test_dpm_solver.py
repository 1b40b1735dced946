"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2,
every other option at its default: midpoint, lower_order_final, final_sigmas_type "zero", linspace spacing) from
the same x_T; its timesteps; learned-variance models; bad input. diffusers is a test-only dependency."""

import pytest
import torch

import biasfast
from biasfast.diffusion.dpm_solver import dpm_solver_timesteps, second_order_corrections
from biasfast.diffusion.sampling import keyed_normal

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = biasfast.NoiseSchedule("linear", 1000)


def _scheduler(prediction="epsilon", **config):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                                 beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2,
                                                 prediction_type=prediction, **config)


def _model(x, t, class_labels=None):
    """A smooth nonlinear stand-in for a denoiser; elementwise, so batching does not change it."""
    scale = (t.to(x.dtype) / 1000).view(-1, *([1] * (x.dim() - 1)))
    return 0.6 * torch.tanh(x) * scale + 0.2 * x * (1 - scale)


def _diffusers_loop(scheduler, x, steps, model=_model):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 15, 20, 25, 50, 999, 1000])
def test_timesteps_are_diffusers_linspace(steps):
    scheduler = _scheduler()
    scheduler.set_timesteps(steps)
    assert dpm_solver_timesteps(SCHEDULE, steps) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 20, 333, 998])
def test_timesteps_follow_the_schedulers_spacing(spacing, offset, steps):
    """A schedule read from the scheduler takes its spacing and offset; DPM-Solver's leading rule (multiples of
    T // (steps + 1)) is not DDIM's, so passing the spacing to a table's schedule gives the same list too."""
    scheduler = _scheduler(timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    read = biasfast.NoiseSchedule(scheduler)
    given = biasfast.NoiseSchedule(scheduler.alphas_cumprod, steps_offset=offset)
    expected = scheduler.timesteps.tolist()
    assert dpm_solver_timesteps(read, steps) == dpm_solver_timesteps(given, steps, spacing) == expected


def test_timestep_errors():
    with pytest.raises(ValueError, match="spacing: unknown 'karras' for DPM-Solver"):
        biasfast.sample(_model, (2, 1, 3, 3), SCHEDULE, method="dpmsolver++", spacing="karras", progress=False)
    offset = biasfast.NoiseSchedule("linear", spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="steps: 999 leading DPM-Solver.. steps with steps_offset 1 do not fit"):
        dpm_solver_timesteps(offset, 999)
    with pytest.raises(ValueError, match="steps: 1000 leading DPM-Solver.. steps with steps_offset 0 do not fit"):
        dpm_solver_timesteps(SCHEDULE, 1000, "leading")


def test_first_and_last_steps_are_first_order():
    timesteps = dpm_solver_timesteps(SCHEDULE, 10)
    corrections = second_order_corrections(SCHEDULE, timesteps)
    assert corrections[0] == 0 and corrections[-1] == 0 and all(c > 0 for c in corrections[1:-1])
    assert second_order_corrections(SCHEDULE, dpm_solver_timesteps(SCHEDULE, 1)) == [0.0]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_equals_diffusers_from_the_same_x_T(prediction, steps):
    scheduler = _scheduler(prediction)
    schedule = biasfast.NoiseSchedule(scheduler.alphas_cumprod)  # diffusers' float32 ᾱ table, exactly
    n, shape = 5, (3, 7, 6)
    ours = biasfast.sample(_model, (n, *shape), schedule, method="dpmsolver++", steps=steps, prediction=prediction,
                           seed=4, progress=False)
    x_T = keyed_normal(4, range(n), 0, shape, torch.device("cpu"), torch.float32)
    theirs = _diffusers_loop(scheduler, x_T, steps)
    # float32 on both sides, coefficients in float64 here and float32 there: ~1e-6 of the scale per step
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    ddim = biasfast.sample(_model, (n, *shape), schedule, method="ddim", steps=steps, prediction=prediction, seed=4,
                           progress=False, spacing="linspace")
    assert (ours - theirs).abs().max() < 0.01 * (ddim - theirs).abs().max()  # a first-order sampler is far off: the match is not a loose tolerance


def test_dpm_solver_float64_loop_equals_diffusers_in_float64():
    scheduler = _scheduler()
    schedule = biasfast.NoiseSchedule(scheduler.alphas_cumprod)
    n, shape = 3, (2, 5, 5)
    ours = biasfast.sample(_model, (n, *shape), schedule, method="dpmsolver++", steps=12, seed=8, progress=False,
                           dtype=torch.float64)
    x_T = keyed_normal(8, range(n), 0, shape, torch.device("cpu"), torch.float64)
    theirs = _diffusers_loop(scheduler, x_T, 12)  # diffusers computes each step in float32 (sample.to(float32))
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_guidance_and_learned_variance_channels():
    labels = torch.arange(4)

    def conditional(x, t, class_labels=None):
        shift = 0.0 if class_labels is None else 0.05 * class_labels.to(x.dtype).view(-1, 1, 1, 1)
        return _model(x, t) + shift

    def learned(x, t, class_labels=None):  # a learn_sigma model: the same ε̂, then a variance half
        return torch.cat([conditional(x, t, class_labels), torch.tanh(3 * x)], dim=1)

    kwargs = dict(method="dpmsolver++", steps=8, guidance_scale=3.0, class_labels=labels, seed=1, progress=False)
    plain = biasfast.sample(conditional, (4, 2, 3, 3), SCHEDULE, **kwargs)
    assert torch.equal(biasfast.sample(learned, (4, 2, 3, 3), SCHEDULE, variance="learned_range", **kwargs), plain)

    scheduler = _scheduler()
    schedule = biasfast.NoiseSchedule(scheduler.alphas_cumprod)
    x_T = keyed_normal(1, range(4), 0, (2, 3, 3), torch.device("cpu"), torch.float32)
    mixed = lambda x, t: conditional(x, t) + 3.0 * (conditional(x, t, labels) - conditional(x, t))  # noqa: E731
    ours = biasfast.sample(conditional, (4, 2, 3, 3), schedule, **kwargs)
    theirs = _diffusers_loop(scheduler, x_T, 8, mixed)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_coupled_dpm_solver_is_batch_size_invariant():
    models = [_model, lambda x, t, c=None: 0.5 * _model(x, t)]
    whole = biasfast.sample_coupled(models, 5, (2, 3, 3), SCHEDULE, method="dpmsolver++", steps=6, progress=False)
    split = biasfast.sample_coupled(models, 5, (2, 3, 3), SCHEDULE, method="dpmsolver++", steps=6, progress=False,
                                    batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(whole, split)) and not torch.equal(*whole)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eta=0.5), "eta: DPM-Solver"),
        (dict(clip_sample=1.0), "clip_sample: not supported"),
        (dict(steps=1001), r"steps: expected an int in \[1, 1000\]"),
        (dict(variance="learned"), "variance: unknown 'learned'"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        biasfast.sample(_model, (2, 1, 3, 3), SCHEDULE, method="dpmsolver++", progress=False, **kwargs)
