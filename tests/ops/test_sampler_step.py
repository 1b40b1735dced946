"""Fused sampler step (C++ and Triton) against the float64 diffusers-formula reference; sampling loops;
coupled sampling's batch-size invariance; opcheck; torch.compile; bad input."""

import itertools

import pytest
import torch

import biasfast
from biasfast._core import dispatch
from biasfast.diffusion.sampling import keyed_normal, step
from biasfast.ops import reference
from tests.triton_backend import TRITON_DEVICE, needs_triton, triton_kernel

SCHEDULE = biasfast.NoiseSchedule("linear", 1000)
SHAPE = (6, 3, 7, 9)
COMBOS = list(itertools.product(["ddpm", "ddim"], ["epsilon", "sample", "v_prediction"], [None, 3.5]))

IMPLEMENTATIONS = ["cpp", pytest.param("triton", marks=needs_triton)]


def _op(implementation):
    """The functional step of one backend: the op's CPU kernel, or its Triton kernel on the Triton device."""
    if implementation == "cpp":
        return torch.ops.biasfast.sampler_step
    return triton_kernel("sampler_step", "sampler_step")


def _out_op(implementation):
    if implementation == "cpp":
        return torch.ops.biasfast.sampler_step.out
    return triton_kernel("sampler_step", "sampler_step_out")


def _inputs(dtype=torch.float32, shape=SHAPE, guided=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, cond, uncond, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    t = torch.randint(1, 1000, (shape[0],), generator=g)
    t_prev = (t * torch.rand(shape[0], generator=g)).long() - 1  # in [-1, t - 1]
    t_prev[0] = -1  # always exercise the final step
    return x, cond, uncond if guided else None, noise, t, t_prev


def _reference64(x, cond, uncond, noise, t, t_prev, method, prediction, eta, scale, clip, variance="fixed_small"):
    d = lambda v: None if v is None else v.double()  # noqa: E731
    return reference.sampler_step(d(x), d(cond), t, t_prev, SCHEDULE.alphas_cumprod, method=method,
                                  prediction=prediction, eta=eta, guidance_scale=scale, uncond_output=d(uncond),
                                  noise=d(noise), clip_sample=clip, variance=variance)


def _assert_relative(actual, expected, rtol):
    # Relative to the result's scale: single elements may cancel to ~0, where any rounding is "relative" ∞.
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method,prediction,scale", COMBOS)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_every_combination_matches_float64_reference(implementation, method, prediction, scale, clip):
    eta = 0.0 if method == "ddpm" else 0.7
    x, cond, uncond, noise, t, t_prev = _inputs(guided=scale is not None)
    x_prev, x0 = _op(implementation)(x, cond, uncond, noise, t, t_prev, SCHEDULE.table("cpu", torch.float64),
                                     method, prediction, eta, scale, clip, True)
    ref_prev, ref_x0 = _reference64(x, cond, uncond, noise, t, t_prev, method, prediction, eta, scale, clip)
    assert x_prev.dtype == torch.float32 and x_prev.shape == SHAPE
    _assert_relative(x_prev, ref_prev, 1e-6)
    _assert_relative(x0, ref_x0, 1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_float64_is_exact_to_rounding(eta, prediction):
    x, cond, uncond, noise, t, t_prev = _inputs(torch.float64)
    out = step(x, cond, t, t_prev, SCHEDULE, eta=eta, prediction=prediction, guidance_scale=1.7,
               uncond_output=uncond, noise=noise, clip_sample=2.0)
    ref, _ = _reference64(x, cond, uncond, noise, t, t_prev, "ddim", prediction, eta, 1.7, 2.0)
    _assert_relative(out, ref, 1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_reduced_precision(implementation, dtype, rtol):
    x, cond, uncond, noise, t, t_prev = _inputs(dtype)
    out, _ = _op(implementation)(x, cond, uncond, noise, t, t_prev, SCHEDULE.table("cpu", torch.float64), "ddim",
                                 "epsilon", 1.0, 2.0, 1.0, False)
    assert out.dtype == dtype
    _assert_relative(out, _reference64(x, cond, uncond, noise, t, t_prev, "ddim", "epsilon", 1.0, 2.0, 1.0)[0], rtol)


def test_scalar_timesteps_equal_per_sample_ones():
    x, cond, _, noise, _, _ = _inputs(guided=False)
    scalar = step(x, cond, 500, 480, SCHEDULE, method="ddpm", noise=noise)
    tensor = step(x, cond, torch.full((SHAPE[0],), 500), torch.tensor(480), SCHEDULE, method="ddpm", noise=noise)
    assert torch.equal(scalar, tensor)


def test_guidance_follows_both_conventions():
    # diffusers' s with ε_u + s(ε_c − ε_u) equals Ho & Salimans' (1 + w)ε_c − wε_u at s = 1 + w.
    x, cond, uncond, _, t, t_prev = _inputs(torch.float64)
    w = 2.0
    mixed = (1 + w) * cond - w * uncond
    guided = step(x, cond, t, t_prev, SCHEDULE, guidance_scale=1 + w, uncond_output=uncond)
    torch.testing.assert_close(guided, step(x, mixed, t, t_prev, SCHEDULE), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,prediction,scale", COMBOS)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_clipped_model_output_matches_float64_reference(method, prediction, scale, dtype, rtol):
    # ε̂ re-derived from the clipped x̂0 (guided-diffusion's ddim_sample, diffusers' use_clipped_model_output).
    eta = 0.0 if method == "ddpm" else 0.7
    x, cond, uncond, noise, t, t_prev = _inputs(dtype, guided=scale is not None, seed=3)
    options = dict(method=method, prediction=prediction, eta=eta, guidance_scale=scale, uncond_output=uncond,
                   noise=noise, clip_sample=1.0)
    expected, expected_x0 = _reference64(x, cond, uncond, noise, t, t_prev, method, prediction, eta, scale, 1.0)
    d = lambda v: v if v is None else v.double()  # noqa: E731
    if method == "ddim":
        eps = (x.double() - SCHEDULE.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * expected_x0) / (
            1 - SCHEDULE.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        expected, _ = reference.sampler_step(x.double(), eps, t, t_prev, SCHEDULE.alphas_cumprod, method=method,
                                             eta=eta, noise=d(noise))
    oracle, _ = reference.sampler_step(x.double(), cond.double(), t, t_prev, SCHEDULE.alphas_cumprod, method=method,
                                       prediction=prediction, eta=eta, guidance_scale=scale, uncond_output=d(uncond),
                                       noise=d(noise), clip_sample=1.0, use_clipped_model_output=True)
    torch.testing.assert_close(oracle, expected, rtol=1e-10, atol=1e-10)  # the oracle against its definition
    out, x0 = step(x, cond, t, t_prev, SCHEDULE, use_clipped_model_output=True, return_x0=True, **options)
    _assert_relative(out, expected, rtol)
    _assert_relative(x0, expected_x0, rtol)
    plain = step(x, cond, t, t_prev, SCHEDULE, **options)
    assert torch.equal(out, plain) == (method == "ddpm")  # DDPM's posterior mean already uses the clipped x̂0


def test_clipped_model_output_needs_clip_sample_and_writes_out():
    x, cond, uncond, noise, t, t_prev = _inputs()
    with pytest.raises(ValueError, match="use_clipped_model_output: needs clip_sample"):
        step(x, cond, t, t_prev, SCHEDULE, use_clipped_model_output=True)
    expected = step(x, cond, t, t_prev, SCHEDULE, clip_sample=1.0, use_clipped_model_output=True)
    assert step(x, cond, t, t_prev, SCHEDULE, clip_sample=1.0, use_clipped_model_output=True, out=x) is x
    assert torch.equal(x, expected)


def test_final_step_returns_x0_for_ddim():
    # t_prev = -1 means ᾱ_prev = 1: the DDIM step lands exactly on x̂0.
    x, cond, _, _, t, _ = _inputs(torch.float64, guided=False)
    out, x0 = step(x, cond, t, -1, SCHEDULE, return_x0=True)
    torch.testing.assert_close(out, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_final_alpha_cumprod_moves_only_the_final_steps(implementation, method, eta):
    """diffusers' DDIMScheduler(set_alpha_to_one=False) ends at ᾱ_0, not 1: the final rows (t_prev = −1) go there,
    every other row is bit for bit the default step."""
    x, cond, uncond, noise, t, t_prev = _inputs(seed=3)
    t_prev[1] = -1
    t[1] = 0  # a final step from t = 0 to ᾱ_0 itself: DDIM's σ is 0 there
    final = float(SCHEDULE.alphas_cumprod[0])
    args = (x, cond, uncond, noise, t, t_prev, SCHEDULE.table("cpu", torch.float64), method, "epsilon", eta, 2.0, 1.0)
    moved, moved_x0 = _op(implementation)(*args, True, "fixed_small", final)
    plain, _ = _op(implementation)(*args, True)
    d = lambda v: v.double()  # noqa: E731
    expected, expected_x0 = reference.sampler_step(
        d(x), d(cond), t, t_prev, SCHEDULE.alphas_cumprod, method=method, eta=eta, guidance_scale=2.0,
        uncond_output=d(uncond), noise=d(noise), clip_sample=1.0, final_alpha_cumprod=final)
    _assert_relative(moved, expected, 1e-6)
    _assert_relative(moved_x0, expected_x0, 1e-6)
    final_rows = t_prev == -1
    assert torch.equal(moved[~final_rows], plain[~final_rows])
    assert (moved[final_rows] - plain[final_rows]).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_out_variant_in_place_equals_functional(implementation):
    x, cond, uncond, noise, t, t_prev = _inputs()
    table = SCHEDULE.table("cpu", torch.float64)
    functional, into = _op(implementation), _out_op(implementation)
    args = ("ddim", "v_prediction", 1.0, 2.0, 1.0)
    expected, expected_x0 = functional(x, cond, uncond, noise, t, t_prev, table, *args, True)
    x0 = torch.empty_like(x)
    into(x, cond, uncond, noise, t, t_prev, table, *args, x, x0)  # in place: out is x_t
    assert torch.equal(x, expected) and torch.equal(x0, expected_x0)


def test_step_out_argument():
    x, cond, uncond, noise, t, t_prev = _inputs()
    expected = step(x, cond, t, t_prev, SCHEDULE, eta=1.0, noise=noise)
    out = torch.empty_like(x)
    assert step(x, cond, t, t_prev, SCHEDULE, eta=1.0, noise=noise, out=out) is out
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        step(x, cond, t, t_prev, SCHEDULE, out=torch.empty(SHAPE[::-1]).permute(3, 2, 1, 0))
    with pytest.raises(ValueError, match="'out': partially overlaps"):
        flat = torch.cat([x.flatten(), x.flatten()[:9]])
        step(flat[:x.numel()].view(SHAPE), cond, t, t_prev, SCHEDULE, out=flat[9:].view(SHAPE))


def test_non_contiguous_inputs():
    x, cond, uncond, noise, t, t_prev = _inputs(shape=(6, 9, 7, 3))
    xs, cs, us, zs = (v.permute(0, 3, 2, 1) for v in (x, cond, uncond, noise))
    out = step(xs, cs, t, t_prev, SCHEDULE, eta=1.0, guidance_scale=2.0, uncond_output=us, noise=zs)
    ref, _ = _reference64(xs, cs, us, zs, t, t_prev, "ddim", "epsilon", 1.0, 2.0, None)
    _assert_relative(out, ref, 1e-6)


# ---- learned variance (guided-diffusion LEARNED_RANGE) ----

def _learned_inputs(dtype=torch.float32, shape=SHAPE, guided=True, seed=1):
    """x_t (B, C, ...) and model outputs (B, 2C, ...): prediction, then v, v a little past [−1, 1] (unclamped)."""
    x, cond, uncond, noise, t, t_prev = _inputs(dtype, shape, guided, seed)
    g = torch.Generator().manual_seed(seed + 100)
    v = (2.4 * torch.rand(shape, generator=g) - 1.2).to(dtype)
    with_v = lambda p: None if p is None else torch.cat([p, v if p is cond else -v], dim=1)  # noqa: E731
    return x, with_v(cond), with_v(uncond), noise, t, t_prev


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method,prediction,scale", COMBOS)
def test_learned_variance_matches_float64_reference(implementation, method, prediction, scale):
    eta = 0.0 if method == "ddpm" else 0.7
    x, cond, uncond, noise, t, t_prev = _learned_inputs(guided=scale is not None)
    x_prev, x0 = _op(implementation)(x, cond, uncond, noise, t, t_prev, SCHEDULE.table("cpu", torch.float64),
                                     method, prediction, eta, scale, None, True, "learned_range")
    ref_prev, ref_x0 = _reference64(x, cond, uncond, noise, t, t_prev, method, prediction, eta, scale, None,
                                    "learned_range")
    assert x_prev.shape == SHAPE
    _assert_relative(x_prev, ref_prev, 1e-6)
    _assert_relative(x0, ref_x0, 1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_learned_variance_moves_only_the_ddpm_noise(implementation):
    # v = −1 gives the posterior variance β̃' (fixed_small), v = +1 the step's β'; DDIM never reads v.
    x, cond, _, noise, t, t_prev = _inputs(guided=False)
    table, op = SCHEDULE.table("cpu", torch.float64), _op(implementation)

    def ddpm(v, variance="learned_range"):
        output = cond if v is None else torch.cat([cond, torch.full_like(cond, v)], 1)
        return op(x, output, None, noise, t, t_prev, table, "ddpm", "epsilon", 0.0, None, None, False,
                  variance)[0].double()

    fixed = ddpm(None, "fixed_small")
    _assert_relative(ddpm(-1.0), fixed, 1e-6)
    alpha = SCHEDULE.alphas_cumprod
    prev = torch.where(t_prev >= 0, alpha[t_prev.clamp(min=0)], torch.ones(()))
    beta = 1 - alpha[t] / prev
    posterior = (1 - prev) / (1 - alpha[t]) * beta
    gap = torch.where(t > 0, beta.sqrt() - posterior.sqrt(), torch.zeros(())).view(-1, 1, 1, 1)
    _assert_relative(ddpm(1.0), fixed + gap * noise.double(), 1e-6)
    ddim = op(x, cond, None, None, t, t_prev, table, "ddim", "epsilon", 0.0, None, None, False)[0]
    ddim_v = op(x, torch.cat([cond, torch.randn_like(cond)], 1), None, None, t, t_prev, table, "ddim", "epsilon",
                0.0, None, None, False, "learned_range")[0]
    assert torch.equal(ddim_v, ddim)


def _guided_diffusion_respaced(alphas_cumprod, use_timesteps):
    """A float64 transcription of guided-diffusion's SpacedDiffusion.__init__ + GaussianDiffusion tables: the
    respaced betas 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}} and the posterior tables p_sample reads."""
    kept = sorted(use_timesteps)
    betas, last = [], 1.0
    for i, alpha in enumerate(alphas_cumprod.tolist()):
        if i in use_timesteps:
            betas.append(1 - alpha / last)
            last = alpha
    betas = torch.tensor(betas, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return dict(
        timestep_map=torch.tensor(kept),
        sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
        posterior_log_variance_clipped=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        log_betas=betas.log(),
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        posterior_mean_coef2=(1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    )


def _guided_diffusion_p_sample(tables, model_output, x, index, noise, clip_denoised=True):
    """guided-diffusion p_mean_variance (EPSILON, LEARNED_RANGE) + p_sample at respaced indices `index` (B,)."""
    view = lambda a: a[index].view(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    eps, v = model_output.split(x.shape[1], dim=1)
    frac = (v + 1) / 2
    log_variance = frac * view(tables["log_betas"]) + (1 - frac) * view(tables["posterior_log_variance_clipped"])
    x0 = view(tables["sqrt_recip_alphas_cumprod"]) * x - view(tables["sqrt_recipm1_alphas_cumprod"]) * eps
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    mean = view(tables["posterior_mean_coef1"]) * x0 + view(tables["posterior_mean_coef2"]) * x
    nonzero = (index != 0).double().view(-1, *([1] * (x.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * log_variance) * noise


def _space_timesteps(num_timesteps, count):
    """guided-diffusion space_timesteps(num_timesteps, [count]): one section, strides rounded."""
    stride = (num_timesteps - 1) / (count - 1)
    return {round(i * stride) for i in range(count)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("count", [10, 37])
def test_respaced_learned_variance_step_equals_guided_diffusion(implementation, count):
    use = _space_timesteps(1000, count)
    tables = _guided_diffusion_respaced(SCHEDULE.alphas_cumprod, use)
    kept = tables["timestep_map"]
    g = torch.Generator().manual_seed(count)
    index = torch.cat([torch.tensor([0, 1, count - 1]), torch.randint(0, count, (4,), generator=g)])
    shape = (index.numel(), 3, 5, 7)
    x, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    model_output = torch.cat([torch.randn(shape, generator=g), 2 * torch.rand(shape, generator=g) - 1], dim=1)
    t, t_prev = kept[index], torch.where(index > 0, kept[(index - 1).clamp(min=0)], -1)
    out = _op(implementation)(x, model_output, None, noise, t, t_prev, SCHEDULE.table("cpu", torch.float64),
                              "ddpm", "epsilon", 0.0, None, 1.0, False, "learned_range")[0]
    expected = _guided_diffusion_p_sample(tables, model_output.double(), x.double(), index, noise.double())
    _assert_relative(out, expected, 1e-6)


def test_learned_variance_loop_equals_guided_diffusion_p_sample_loop():
    # guided-diffusion "ddim10" respacing = range(0, 1000, 100) = biasfast's leading spacing of 10 steps
    def model(x, t, class_labels=None):  # a learned-variance model: ε̂, then v in (−1, 1)
        scale = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return torch.cat([0.3 * x * scale, torch.tanh(x) * (1 - scale)], dim=1)

    n, shape = 3, (2, 4, 5)
    out = biasfast.sample(model, (n, *shape), SCHEDULE, steps=10, method="ddpm", variance="learned_range",
                          clip_sample=1.0, seed=5, progress=False, dtype=torch.float64)
    tables = _guided_diffusion_respaced(SCHEDULE.alphas_cumprod, set(range(0, 1000, 100)))
    x = keyed_normal(5, range(n), 0, shape, torch.device("cpu"), torch.float64)
    for k, index in enumerate(reversed(range(10))):
        noise = keyed_normal(5, range(n), k + 1, shape, torch.device("cpu"), torch.float64)
        indices = torch.full((n,), index)
        x = _guided_diffusion_p_sample(tables, model(x, tables["timestep_map"][indices]), x, indices, noise)
    _assert_relative(out, x, 1e-11)


def test_learned_range_equals_diffusers_ddpm_scheduler():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="learned_range", clip_sample=True)
    scheduler.set_timesteps(25)
    schedule = biasfast.NoiseSchedule(scheduler.alphas_cumprod)
    g = torch.Generator().manual_seed(3)
    x = ours = torch.randn(2, 3, 6, 5, generator=g)
    theirs_noise, our_noise = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)

    def model(sample):  # ε̂, then v = sin(3x) ∈ [−1, 1]
        return torch.cat([0.4 * sample, torch.sin(3 * sample)], dim=1)

    timesteps = scheduler.timesteps.tolist()
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        x = scheduler.step(model(x), t, x, generator=theirs_noise).prev_sample
        # diffusers draws its noise from the generator only where t > 0
        noise = torch.randn(ours.shape, generator=our_noise) if t > 0 else torch.zeros_like(ours)
        ours = step(ours, model(ours), t, t_prev, schedule, method="ddpm", variance="learned_range",
                    clip_sample=1.0, noise=noise)
    _assert_relative(ours, x.double(), 2e-5)


# ---- loops ----

def _toy_model(scale=0.3):
    """Elementwise, so its outputs do not depend on the batch it is called with."""

    def model(x, t, class_labels=None):
        shift = 0.0 if class_labels is None else class_labels.to(x.dtype).view(-1, 1, 1, 1) * 0.01
        return scale * x * (t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + shift

    return model


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_fifty_step_ddim_loop_equals_reference_loop(dtype, rtol):
    model, n, shape = _toy_model(), 5, (2, 5, 3)
    labels = torch.arange(n)
    out = biasfast.sample(model, (n, *shape), SCHEDULE, steps=50, eta=0.5, guidance_scale=2.0, class_labels=labels,
                          seed=7, progress=False, dtype=dtype, clip_sample=1.0)
    timesteps = SCHEDULE.timesteps(50).tolist()
    x = keyed_normal(7, range(n), 0, shape, torch.device("cpu"), torch.float64)
    for k, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [-1])):
        tt = torch.full((n,), t)
        noise = keyed_normal(7, range(n), k + 1, shape, torch.device("cpu"), torch.float64)
        x, _ = reference.sampler_step(x, model(x, tt, labels), tt, torch.full((n,), t_prev), SCHEDULE.alphas_cumprod,
                                      eta=0.5, guidance_scale=2.0, uncond_output=model(x, tt), noise=noise,
                                      clip_sample=1.0)
    assert out.dtype == dtype
    _assert_relative(out, x, rtol)


@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_coupled_sampling_is_batch_size_invariant(method, eta):
    kwargs = dict(seed=3, steps=10, method=method, eta=eta, progress=False)
    models = [_toy_model(0.3), _toy_model(0.5)]
    whole = biasfast.sample_coupled(models, 7, (3, 4, 4), SCHEDULE, **kwargs)
    for batch_size in (1, 3):
        split = biasfast.sample_coupled(models, 7, (3, 4, 4), SCHEDULE, batch_size=batch_size, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(whole, split))
    prefix = biasfast.sample_coupled(models[:1], 4, (3, 4, 4), SCHEDULE, **kwargs)[0]
    assert torch.equal(prefix, whole[0][:4])  # sample j's noise does not depend on n either
    assert not torch.equal(whole[0], whole[1])
    pieces = [biasfast.sample_coupled(models, stop - start, (3, 4, 4), SCHEDULE, first_index=start, **kwargs)
              for start, stop in ((0, 2), (2, 7))]  # made in pieces, keyed by the global index
    assert all(torch.equal(torch.cat([p[m] for p in pieces]), whole[m]) for m in range(2))


def test_identical_models_give_identical_samples_with_guidance():
    models = [_toy_model(), _toy_model()]
    a, b = biasfast.sample_coupled(models, 5, (2, 3, 3), SCHEDULE, steps=8, eta=1.0, guidance_scale=3.0,
                                   class_labels=torch.tensor([0, 1, 2, 3, 4]), progress=False, batch_size=2)
    assert torch.equal(a, b)
    batched = biasfast.sample_coupled(models[:1], 5, (2, 3, 3), SCHEDULE, steps=8, eta=1.0, guidance_scale=3.0,
                                      class_labels=torch.tensor([0, 1, 2, 3, 4]), progress=False, null_label=0)[0]
    # null label 0 shifts by 0, like the None call: the batched CFG call gives the same samples
    torch.testing.assert_close(batched, a, rtol=0, atol=0)


def test_seed_changes_samples():
    model = _toy_model()
    a = biasfast.sample(model, (2, 3, 4, 4), SCHEDULE, steps=5, seed=0, progress=False)
    b = biasfast.sample(model, (2, 3, 4, 4), SCHEDULE, steps=5, seed=1, progress=False)
    assert not torch.equal(a, b)


def _dummy_sample_deter():
    # diffusers tests/schedulers/test_schedulers.py: SchedulerCommonTest.dummy_sample_deter
    num = 4 * 3 * 8 * 8
    return (torch.arange(num).reshape(3, 8, 8, 4) / num).permute(3, 0, 1, 2)


@pytest.mark.parametrize("prediction,total,mean", [("epsilon", 258.9606, 0.3372), ("v_prediction", 202.0296, 0.2631)])
def test_diffusers_ddpm_full_loop_golden_numbers(prediction, total, mean):
    # diffusers DDPMSchedulerTest.test_full_loop_no_noise / _with_v_prediction: linear betas, fixed_small,
    # clip_sample 1.0, dummy_model = sample * t / (t + 1), noise torch.randn(shape, generator=manual_seed(0)) if t > 0.
    schedule = biasfast.NoiseSchedule(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0))
    sample = _dummy_sample_deter()
    generator = torch.manual_seed(0)
    for t in reversed(range(1000)):
        residual = sample * t / (t + 1)
        noise = torch.randn(sample.shape, generator=generator) if t > 0 else torch.zeros_like(sample)
        sample = step(sample, residual, t, t - 1, schedule, method="ddpm", prediction=prediction, noise=noise,
                      clip_sample=1.0)
    assert abs(sample.abs().sum().item() - total) < 1e-2
    assert abs(sample.abs().mean().item() - mean) < 1e-3


# ---- registration, compile ----

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("method,prediction,scale", [("ddim", "epsilon", 2.0), ("ddpm", "v_prediction", None)])
def test_opcheck(device, method, prediction, scale):
    x, cond, uncond, noise, t, t_prev = (None if v is None else v.to(device)
                                        for v in _inputs(shape=(3, 2, 5), guided=scale is not None))
    args = (x, cond, uncond, noise, t, t_prev, SCHEDULE.table(device, torch.float64), method, prediction, 0.0, scale,
            1.0)
    torch.library.opcheck(torch.ops.biasfast.sampler_step.default, (*args, True))
    torch.library.opcheck(torch.ops.biasfast.sampler_step.default, (*args, True, "fixed_small", 0.9999))
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.biasfast.sampler_step.out, (*args, out, x0))
    torch.library.opcheck(torch.ops.biasfast.sampler_step.out, (*args, out, x0, "fixed_small", 0.9999))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_opcheck_learned_variance(device, method):
    x, cond, uncond, noise, t, t_prev = (None if v is None else v.to(device)
                                        for v in _learned_inputs(shape=(3, 2, 5), guided=True))
    args = (x, cond, uncond, noise, t, t_prev, SCHEDULE.table(device, torch.float64), method, "epsilon", 0.0, 2.0,
            None)
    torch.library.opcheck(torch.ops.biasfast.sampler_step.default, (*args, True, "learned_range"))
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.biasfast.sampler_step.out, (*args, out, x0, "learned_range"))


def test_torch_compile_fullgraph_learned_variance():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def learned_step(x, output, noise, t, t_prev):
        return step(x, output, t, t_prev, SCHEDULE, method="ddpm", noise=noise, variance="learned_range")

    x, cond, _, noise, t, t_prev = _learned_inputs(guided=False)
    ref, _ = _reference64(x, cond, None, noise, t, t_prev, "ddpm", "epsilon", 0.0, None, None, "learned_range")
    _assert_relative(learned_step(x, cond, noise, t, t_prev), ref, 1e-6)


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def guided_step(x, cond, uncond, noise, t, t_prev):
        return step(x, cond, t, t_prev, SCHEDULE, eta=1.0, guidance_scale=2.0, uncond_output=uncond, noise=noise,
                    clip_sample=1.0)

    x, cond, uncond, noise, t, t_prev = _inputs()
    ref, _ = _reference64(x, cond, uncond, noise, t, t_prev, "ddim", "epsilon", 1.0, 2.0, 1.0)
    _assert_relative(guided_step(x, cond, uncond, noise, t, t_prev), ref, 1e-6)


@pytest.mark.gpu
def test_cuda_op_runs_triton_under_torch_compile():
    assert dispatch.implementation("sampler_step", "cuda") == "Triton"

    @torch.compile(fullgraph=True, backend="aot_eager")
    def guided_step(x, cond, uncond, noise, t, t_prev, table):
        return torch.ops.biasfast.sampler_step(x, cond, uncond, noise, t, t_prev, table, "ddim", "epsilon",
                                               1.0, 2.0, 1.0, False)[0] * 2

    cpu = _inputs()
    ref, _ = _reference64(*cpu, "ddim", "epsilon", 1.0, 2.0, 1.0)
    out = guided_step(*(v.to(TRITON_DEVICE) for v in cpu), SCHEDULE.table(TRITON_DEVICE, torch.float64))
    _assert_relative(out.cpu(), 2 * ref, 1e-6)


@pytest.mark.gpu
def test_cuda_step_matches_cpu_and_is_graph_capturable():
    cpu = _inputs()
    x, cond, uncond, noise, t, t_prev = (v.cuda() for v in cpu)
    options = dict(eta=1.0, guidance_scale=2.0, uncond_output=uncond, noise=noise, clip_sample=1.0)
    expected = step(x, cond, t, t_prev, SCHEDULE, **options)
    reference_cpu, _ = _reference64(*cpu, "ddim", "epsilon", 1.0, 2.0, 1.0)
    _assert_relative(expected.cpu(), reference_cpu, 1e-6)
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compilation and the device table happen outside the capture
        step(x, cond, t, t_prev, SCHEDULE, out=out, **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, cond, t, t_prev, SCHEDULE, out=out, **options)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


# ---- bad input ----

def _bad(**overrides):
    x, cond, uncond, noise, t, t_prev = _inputs(guided=False)
    args = dict(x_t=x, model_output=cond, t=t, t_prev=t_prev, schedule=SCHEDULE)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(model_output=torch.ones(6, 3, 7, 8)), ValueError, "model_output: shape"),
        (dict(guidance_scale=2.0, uncond_output=torch.ones(6, 3, 7, 8)), ValueError, "uncond_output: shape"),
        (dict(guidance_scale=2.0), ValueError, "uncond_output: required when guidance_scale"),
        (dict(uncond_output=torch.ones(SHAPE)), ValueError, "guidance_scale: required"),
        (dict(t=1000), ValueError, r"t: 1000 is outside \[0, 1000\)"),
        (dict(t=torch.full((6,), 1000)), ValueError, r"t: values must lie in \[0, 1000\)"),
        (dict(t=500, t_prev=500), ValueError, "t_prev: values must satisfy"),
        (dict(t_prev=-2), ValueError, r"t_prev: -2 is outside \[-1, 1000\)"),
        (dict(t=torch.ones(6)), TypeError, "t: expected an integer tensor"),
        (dict(t=torch.ones(5, dtype=torch.long)), ValueError, r"t: expected shape \(\) or \(6,\)"),
        (dict(method="euler"), ValueError, "method: unknown 'euler'"),
        (dict(prediction="x0"), ValueError, "prediction: unknown 'x0'"),
        (dict(method="ddpm"), ValueError, "noise: required"),
        (dict(eta=0.5), ValueError, "noise: required"),
        (dict(eta=1.5, noise=torch.ones(SHAPE)), ValueError, r"eta: expected a number in \[0, 1\]"),
        (dict(noise=torch.ones(SHAPE, dtype=torch.float64), eta=1.0), TypeError, "noise: dtype"),
        (dict(clip_sample=0.0), ValueError, "clip_sample: expected a positive"),
        (dict(variance="learned"), ValueError, "variance: unknown 'learned'"),
        (dict(final_alpha_cumprod=0.0), ValueError, r"final_alpha_cumprod: expected a number in \(0, 1\]"),
        (dict(final_alpha_cumprod=float("nan")), ValueError, "final_alpha_cumprod: expected a number"),
        (dict(final_alpha_cumprod=True), ValueError, "final_alpha_cumprod: expected a number"),
        (dict(t=5, t_prev=-1, final_alpha_cumprod=0.5), ValueError, "final_alpha_cumprod: 0.5 is below alphas_cumprod"),
        (dict(variance="learned_range"), ValueError, r"model_output: shape \(6, 3, 7, 9\) does not match "
                                                     r"\(6, 6, 7, 9\), x_t's with 2C channels"),
        (dict(x_t=torch.ones(6), model_output=torch.ones(6), t=5, t_prev=1, variance="learned_range"), ValueError,
         "x_t: a learned variance needs a channel dimension"),
        (dict(x_t=[1.0]), TypeError, "x_t: expected a torch.Tensor"),
        (dict(schedule="linear"), TypeError, "schedule: expected a biasfast.NoiseSchedule"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, match):
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        step(args.pop("x_t"), args.pop("model_output"), args.pop("t"), args.pop("t_prev"), args.pop("schedule"),
             **args)


def test_ops_reject_bad_input_too():
    x, cond, _, noise, t, t_prev = _inputs(guided=False)
    table = SCHEDULE.table("cpu", torch.float64)
    with pytest.raises(ValueError, match="t_prev"):
        torch.ops.biasfast.sampler_step(x, cond, None, None, t, t, table, "ddim", "epsilon", 0.0, None, None, False)
    with pytest.raises(ValueError, match="'final_alpha_cumprod': value 1e-05 is below alphas_cumprod"):
        torch.ops.biasfast.sampler_step(x, cond, None, None, t, t_prev, table, "ddim", "epsilon", 0.0, None, None,
                                        False, "fixed_small", 1e-5)
    with pytest.raises(ValueError, match="'final_alpha_cumprod': expected a value in \\(0, 1\\]"):
        torch.ops.biasfast.sampler_step(x, cond, None, None, t, t_prev, table, "ddim", "epsilon", 0.0, None, None,
                                        False, "fixed_small", 1.5)
    with pytest.raises(ValueError, match="method"):
        torch.ops.biasfast.sampler_step(x, cond, None, noise, t, t_prev, table, "plms", "epsilon", 0.0, None, None,
                                        False)
    with pytest.raises(ValueError, match="'variance': unknown 'learned'"):
        torch.ops.biasfast.sampler_step(x, cond, None, noise, t, t_prev, table, "ddpm", "epsilon", 0.0, None, None,
                                        False, "learned")
    with pytest.raises(ValueError, match="'model_output': shape .* learned_range"):
        torch.ops.biasfast.sampler_step(x, cond, None, noise, t, t_prev, table, "ddpm", "epsilon", 0.0, None, None,
                                        False, "learned_range")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(guidance_scale=2.0), "class_labels: required"),
        (dict(batch_size=0), "batch_size: expected a positive int"),
        (dict(first_index=-1), "first_index: expected a non-negative int"),
        (dict(method="heun"), "method: unknown"),
    ],
)
def test_sampler_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        biasfast.sample_coupled([_toy_model()], 2, (3,), SCHEDULE, progress=False, **kwargs)
