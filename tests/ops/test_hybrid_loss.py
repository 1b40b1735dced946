"""The fused learned-variance hybrid loss (C++ CPU op and Triton op) against the float64 reference, and the
reference against a second transcription of guided-diffusion: values at every timestep edge, ±1 pixels, both
predictions, low-precision inputs, gradients (to v only for the vb term), gradcheck, opcheck, torch.compile,
determinism, the drop-in module, bad input."""

import math

import numpy as np
import pytest
import torch

import biasfast
from biasfast.ops import reference
from biasfast.ops.hybrid_loss import hybrid_loss_table
from tests.triton_backend import TRITON_DEVICE, needs_triton, raises_async_check, triton_kernel
from tests.tolerances import assert_close_to_reference

T = 1000
SCHEDULE = biasfast.NoiseSchedule("linear", T)
TABLE = hybrid_loss_table(SCHEDULE)
DEBIAS = biasfast.weighting("debias", SCHEDULE)
PREDICTIONS = ["epsilon", "sample"]
REDUCTIONS = ["mean", "sum", "none"]
EDGE_TIMESTEPS = [0, 1, 2, T // 2, T - 2, T - 1]
IMPLEMENTATIONS = ["cpp", pytest.param("triton", marks=needs_triton)]


def fused(implementation, *args):
    op = torch.ops.biasfast.hybrid_loss if implementation == "cpp" else triton_kernel("hybrid_loss", "hybrid_loss")
    return op(*args)


def _inputs(shape, dtype=torch.float32, timesteps=None, num_timesteps=T):
    """model_output (B, 2C, ...) = [pred | v] with v in [−1.2, 1.2]; x_start in [−1, 1] with a third of the
    pixels exactly ±1 (guided-diffusion's edge bins) and a few at ±0.999 (just inside them)."""
    batch, channels = shape[0], shape[1]
    pred = torch.randn(shape)
    v = torch.rand(shape) * 2.4 - 1.2
    x_start = torch.rand(shape) * 2 - 1
    edge = torch.rand(shape)
    x_start = torch.where(edge < 1 / 6, -1.0, torch.where(edge < 1 / 3, 1.0, x_start))
    x_start.view(-1)[:: 7] = 0.999
    noise = torch.randn(shape)
    if timesteps is None:
        timesteps = torch.randint(0, num_timesteps, (batch,))
    model_output = torch.cat([pred, v], dim=1).to(dtype)
    assert model_output.shape[1] == 2 * channels
    return model_output, x_start.to(dtype), noise.to(dtype), torch.as_tensor(timesteps)


def _edge_timesteps(batch):
    return torch.tensor([EDGE_TIMESTEPS[i % len(EDGE_TIMESTEPS)] for i in range(batch)])


def _oracle(model_output, x_start, noise, timesteps, weights, prediction, reduction="none", schedule=SCHEDULE):
    """float64 reference on the same (possibly rounded) inputs: loss, mse, vb and d loss / d model_output."""
    out = model_output.detach().double().requires_grad_()
    loss, mse, vb = reference.hybrid_loss(out, x_start.double(), noise.double(), timesteps, schedule.alphas_cumprod,
                                          weights, prediction, reduction, return_terms=True)
    (grad,) = torch.autograd.grad(loss.sum(), out)
    return loss.detach(), mse.detach(), vb.detach(), grad


def assert_relative(actual, expected64, rtol):
    """Per-entry relative error ≤ rtol (the issue's float32 bound is 1e-5 per sample)."""
    error = ((actual.double() - expected64).abs() / expected64.abs().clamp(min=1e-30)).max().item()
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


def assert_gradient_close(actual, expected64, dtype):
    scale = expected64.abs().max().clamp(min=1e-30)  # gradients are O(w/N): compare relative to their size
    assert actual.dtype == dtype and actual.shape == expected64.shape
    if dtype == torch.float64:  # the decoder's tail gradients carry the oracle's own ~1e-8 (see VALUE_RTOL)
        torch.testing.assert_close(actual / scale, expected64 / scale, rtol=1e-6, atol=1e-7)
    else:
        assert_close_to_reference(actual.double() / scale, expected64 / scale, dtype)


# ---- the reference against an independent transcription and against the mathematics -----------------------


class GuidedDiffusionTranscription:
    """guided_diffusion/gaussian_diffusion.py (openai/guided-diffusion, as forked by P2-weighting and Debias):
    GaussianDiffusion.__init__'s numpy tables, q_sample, q_posterior_mean_variance, p_mean_variance
    (LEARNED_RANGE, clip_denoised=False), _predict_xstart_from_eps, _vb_terms_bpd and the RESCALED_MSE branch of
    training_losses, transcribed from memory with one change: _extract_into_tensor gathers in float64 (the
    original's `.float()`), so that it can be a float64 oracle. Starts from the betas, as guided-diffusion does."""

    def __init__(self, betas: np.ndarray, predict_xstart: bool) -> None:
        self.betas = betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = int(betas.shape[0])
        self.predict_xstart = predict_xstart
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def q_sample(self, x_start, t, noise):
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (_extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def p_mean_variance(self, model, x, t):
        B, C = x.shape[:2]
        model_output = model(x, t)
        model_output, model_var_values = torch.split(model_output, C, dim=1)
        min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = model_output if self.predict_xstart else self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "log_variance": model_log_variance, "pred_xstart": pred_xstart}

    def _vb_terms_bpd(self, model, x_start, x_t, t):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t)
        kl = reference.normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -reference.discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return torch.where((t == 0), decoder_nll, kl)

    def training_losses(self, model_output, x_start, t, noise, weight):
        x_t = self.q_sample(x_start, t, noise=noise)
        B, C = x_t.shape[:2]
        model_output, model_var_values = torch.split(model_output, C, dim=1)
        frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
        vb = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t)
        vb = vb * (self.num_timesteps / 1000.0)
        target = x_start if self.predict_xstart else noise
        mse = mean_flat(_extract_into_tensor(weight, t, x_t.shape) * (target - model_output) ** 2)
        return mse + vb


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    res = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps].double()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_reference_matches_the_guided_diffusion_transcription(prediction):
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)  # get_named_beta_schedule("linear", 1000)
    diffusion = GuidedDiffusionTranscription(betas, predict_xstart=prediction == "sample")
    model_output, x_start, noise, timesteps = _inputs((12, 3, 5, 7), torch.float64, _edge_timesteps(12))
    out = model_output.clone().requires_grad_()
    expected = diffusion.training_losses(out, x_start, timesteps, noise, DEBIAS.numpy())
    (expected_grad,) = torch.autograd.grad(expected.sum(), out)
    ours = model_output.clone().requires_grad_()
    schedule = torch.from_numpy(diffusion.alphas_cumprod)
    loss = reference.hybrid_loss(ours, x_start, noise, timesteps, schedule, DEBIAS, prediction, "none")
    (grad,) = torch.autograd.grad(loss.sum(), ours)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


def test_reference_terms_against_the_mathematics():
    """normal_kl is the Gaussian KL; the discretised likelihood's 256 bins telescope to total probability 1."""
    mean1, mean2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    logvar1, logvar2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean1, (0.5 * logvar1).exp()),
                                              torch.distributions.Normal(mean2, (0.5 * logvar2).exp()))
    torch.testing.assert_close(reference.normal_kl(mean1, logvar1, mean2, logvar2), exact, rtol=1e-12, atol=1e-12)
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # pixel values 0..255 scaled to [−1, 1]
    for mean, log_scale in [(0.3, math.log(0.2)), (-0.97, math.log(0.004)), (0.0, math.log(3.0))]:
        log_probs = reference.discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert abs(log_probs.exp().sum().item() - 1.0) < 1e-9
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    normal_cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (reference.approx_standard_normal_cdf(x) - normal_cdf).abs().max() < 2e-4  # the tanh approximation


def test_table_columns_follow_guided_diffusion():
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    diffusion = GuidedDiffusionTranscription(betas, predict_xstart=False)
    expected = np.stack([diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod,
                         diffusion.sqrt_recip_alphas_cumprod, diffusion.sqrt_recipm1_alphas_cumprod,
                         diffusion.posterior_mean_coef1, diffusion.posterior_mean_coef2,
                         diffusion.posterior_log_variance_clipped, np.log(betas)], axis=1)
    torch.testing.assert_close(TABLE, torch.from_numpy(expected), rtol=1e-11, atol=1e-13)


# ---- the kernels against the float64 reference ------------------------------------------------------------

SHAPES = [(6, 1, 1, 1), (6, 3, 5, 7), (7, 2, 17, 19), (6, 1, 129, 129)]  # 16641 > one 16384-element chunk
TRITON_SHAPES = [(6, 1, 1, 1), (6, 3, 5, 7), (2, 1, 130, 131)]  # 17030 > one 16 x 1024 chunk (t = 0 and 1)
CASES = [("cpp", s) for s in SHAPES] + [pytest.param("triton", s, marks=needs_triton) for s in TRITON_SHAPES]
# Inputs are rounded to the dtype first, so the oracle sees what the kernel sees: only the arithmetic differs.
# float64 agrees to ~1e-8 only: in the far tails of the decoder bins the oracle's own 0.5·(1 + tanh u) keeps
# ~1e-16 absolute of a CDF near 1e-9 (the Triton kernel forms tanh through exp, rounding differently); its
# autograd's 1 − tanh² there is worse still: float64 gradients agree to 2.4e-8 of their largest entry (measured).
VALUE_RTOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("implementation,shape", CASES)
def test_matches_float64_reference_at_every_timestep_edge(implementation, shape, prediction, dtype):
    model_output, x_start, noise, timesteps = _inputs(shape, dtype, _edge_timesteps(shape[0]))
    expected_loss, expected_mse, expected_vb, expected_grad = _oracle(model_output, x_start, noise, timesteps,
                                                                      DEBIAS, prediction)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    for reduction in REDUCTIONS:
        loss, mse, vb, grad = fused(implementation, model_output, x_start, noise, timesteps, TABLE, DEBIAS,
                                    prediction, reduction, True)
        assert loss.dtype == mse.dtype == vb.dtype == accumulate and grad.dtype == dtype
        assert_relative(mse, expected_mse, VALUE_RTOL[dtype])
        assert_relative(vb, expected_vb, VALUE_RTOL[dtype])
        reduced = {"none": expected_loss, "sum": expected_loss.sum(), "mean": expected_loss.mean()}[reduction]
        assert_relative(loss, reduced, VALUE_RTOL[dtype])
        scale = 1.0 / shape[0] if reduction == "mean" else 1.0
        assert_gradient_close(grad, expected_grad * scale, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_timestep_float32(implementation, prediction):
    """All T timesteps once each, relative error ≤ 1e-5 per sample. The Triton interpreter (no GPU) takes ~0.1 s
    per program, so there it checks every 9th timestep and the edges; a GPU runs all T."""
    if implementation == "cpp" or TRITON_DEVICE == "cuda":
        timesteps = torch.arange(T)
    else:
        timesteps = torch.cat([torch.arange(0, T, 9), torch.tensor(EDGE_TIMESTEPS)])
    shape = (len(timesteps), 2, 3, 4) if implementation == "cpp" else (len(timesteps), 1, 2, 3)
    model_output, x_start, noise, timesteps = _inputs(shape, torch.float32, timesteps)
    expected_loss, _, expected_vb, expected_grad = _oracle(model_output, x_start, noise, timesteps, DEBIAS, prediction)
    loss, _, vb, grad = fused(implementation, model_output, x_start, noise, timesteps, TABLE, DEBIAS, prediction,
                              "none", True)
    assert_relative(loss, expected_loss, 1e-5)
    assert_relative(vb, expected_vb, 1e-5)
    assert_gradient_close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_gradient_reaches_v_only(prediction):
    """With zero MSE weights the loss is vb alone: no gradient on the prediction channels (stop-gradient mean),
    and the v gradient is the reference's."""
    model_output, x_start, noise, timesteps = _inputs((6, 2, 9, 8), torch.float64, _edge_timesteps(6))
    zeros = torch.zeros(T, dtype=torch.float64)
    out = model_output.clone().requires_grad_()
    loss = biasfast.hybrid_loss(out, x_start, noise, timesteps, SCHEDULE, zeros, prediction=prediction)
    (grad,) = torch.autograd.grad(loss, out)
    assert torch.equal(grad[:, :2], torch.zeros_like(grad[:, :2]))
    assert (grad[:, 2:].flatten(1).abs().amax(1) > 0).all()
    _, _, _, expected = _oracle(model_output, x_start, noise, timesteps, zeros, prediction, "mean")
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_gradcheck_float64(reduction, prediction):
    """The loss is not the antiderivative of its gradient (the vb term sees the mean through a stop-gradient),
    so each part is checked against finite differences of what it differentiates: v against the whole loss,
    the prediction against loss − vb (the weighted MSE; vb, an output without gradient, cancels numerically)."""
    model_output, x_start, noise, _ = _inputs((4, 2, 3, 3), torch.float64)
    timesteps = torch.tensor([0, 1, 500, T - 1])
    pred, v = model_output[:, :2].clone(), model_output[:, 2:].clone()
    reduce = {"none": lambda x: x, "sum": torch.sum, "mean": torch.mean}[reduction]

    def loss(p, v_):
        return biasfast.hybrid_loss(torch.cat([p, v_], 1), x_start, noise, timesteps, SCHEDULE, DEBIAS,
                                    prediction=prediction, reduction=reduction, return_terms=True)

    assert torch.autograd.gradcheck(lambda v_: loss(pred, v_)[0], (v.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda p: loss(p, v.detach())[0] - reduce(loss(p, v.detach())[2]),
                                    (pred.requires_grad_(),))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, reduction):
    op = torch.ops.biasfast.hybrid_loss.default
    model_output, x_start, noise, timesteps = (t.to(device) for t in _inputs((3, 2, 4, 5), torch.float32,
                                                                            [0, 7, T - 1]))
    table, weights = TABLE.to(device), DEBIAS.to(device)
    torch.library.opcheck(op, (model_output.requires_grad_(), x_start, noise, timesteps, table, weights,
                               "epsilon", reduction, True))
    args = (model_output.detach().bfloat16(), x_start.bfloat16(), noise.bfloat16(), timesteps.int(), table,
            weights.float(), "sample", reduction, False)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_and_backward():
    criterion = biasfast.nn.HybridLoss(SCHEDULE, "debias")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(model_output, x_start, noise, timesteps):
        return criterion(model_output * 2, x_start, noise, timesteps)

    model_output, x_start, noise, timesteps = _inputs((4, 3, 8, 8), torch.float32, [0, 1, 300, T - 1])
    model_output = (model_output / 2).requires_grad_()
    loss = step(model_output, x_start, noise, timesteps)
    loss.backward()
    expected_loss, _, _, expected_grad = _oracle(model_output * 2, x_start, noise, timesteps, DEBIAS, "epsilon")
    assert_relative(loss, expected_loss.mean(), 1e-5)
    assert_gradient_close(model_output.grad, expected_grad / 4 * 2, torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bitwise(implementation, dtype):
    shape = (5, 2, 150, 151) if implementation == "cpp" else (3, 1, 40, 41)
    model_output, x_start, noise, timesteps = _inputs(shape, dtype, [0, 3, 999, 0, 4][: shape[0]])
    args = (model_output, x_start, noise, timesteps, TABLE, DEBIAS, "epsilon", "mean", True)
    first = [t.clone() for t in fused(implementation, *args)]
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, fused(implementation, *args)))


def test_same_bits_with_any_thread_count():
    model_output, x_start, noise, timesteps = _inputs((5, 3, 90, 91), torch.float32, [0, 1, 2, 500, 999])
    args = (model_output, x_start, noise, timesteps, TABLE, DEBIAS, "epsilon", "sum", True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [t.clone() for t in fused("cpp", *args)]
        torch.set_num_threads(max(2, threads))
        many = fused("cpp", *args)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_inputs_use_streaming_stores_correctly(dtype):
    # Past 8 MiB of gradient the CPU kernel writes with non-temporal stores (aligned rows: n % 8 == 0).
    model_output, x_start, noise, timesteps = _inputs((3, 2, 512, 520), dtype, [0, 17, 800])
    loss, mse, vb, grad = fused("cpp", model_output, x_start, noise, timesteps, TABLE, DEBIAS, "epsilon", "none",
                                True)
    expected_loss, _, _, expected_grad = _oracle(model_output, x_start, noise, timesteps, DEBIAS, "epsilon")
    assert_relative(loss, expected_loss, 1e-5)
    assert_gradient_close(grad, expected_grad, dtype)


def test_no_grad_gives_the_same_loss_and_no_gradient():
    model_output, x_start, noise, timesteps = _inputs((4, 3, 20, 21), torch.float32, [0, 5, 50, 999])
    with_grad = fused("cpp", model_output, x_start, noise, timesteps, TABLE, DEBIAS, "epsilon", "mean", True)
    without = fused("cpp", model_output, x_start, noise, timesteps, TABLE, DEBIAS, "epsilon", "mean", False)
    assert all(torch.equal(a, b) for a, b in zip(with_grad[:3], without[:3]))
    assert without[3].numel() == 0
    with torch.no_grad():
        loss = biasfast.hybrid_loss(model_output.requires_grad_(), x_start, noise, timesteps, SCHEDULE, DEBIAS)
    assert torch.equal(loss, with_grad[0]) and not loss.requires_grad


def test_public_api_terms_and_upstream_gradient():
    model_output, x_start, noise, timesteps = _inputs((5, 2, 6, 7), torch.float32, [0, 1, 2, 998, 999])
    out = model_output.clone().requires_grad_()
    loss, mse, vb = biasfast.hybrid_loss(out, x_start, noise, timesteps, SCHEDULE, DEBIAS, reduction="none",
                                         return_terms=True)
    upstream = torch.rand(5)
    (grad,) = torch.autograd.grad(loss, out, upstream)
    expected_loss, expected_mse, expected_vb, _ = _oracle(model_output, x_start, noise, timesteps, DEBIAS, "epsilon")
    o = model_output.detach().double().requires_grad_()
    reference_loss = reference.hybrid_loss(o, x_start.double(), noise.double(), timesteps, SCHEDULE.alphas_cumprod,
                                           DEBIAS, reduction="none")
    (expected_grad,) = torch.autograd.grad(reference_loss, o, upstream.double())
    assert not mse.requires_grad and not vb.requires_grad
    assert_relative(mse, expected_mse, 1e-5)
    assert_relative(vb, expected_vb, 1e-5)
    torch.testing.assert_close(loss.double(), DEBIAS[timesteps] * mse.double() + vb.double(), rtol=1e-6, atol=0)
    assert_gradient_close(grad, expected_grad, torch.float32)


def test_weights_none_is_constant_and_vb_rescales_with_the_number_of_timesteps():
    schedule = biasfast.NoiseSchedule("diffusion_lm", 200)  # guided-diffusion's linear at T = 200: vb × 0.2
    model_output, x_start, noise, timesteps = _inputs((4, 2, 5, 5), torch.float32, [0, 1, 100, 199])
    loss, mse, vb = biasfast.hybrid_loss(model_output, x_start, noise, timesteps, schedule, reduction="none",
                                         return_terms=True)
    expected_loss, _, expected_vb, _ = _oracle(model_output, x_start, noise, timesteps, None, "epsilon",
                                               schedule=schedule)
    assert_relative(loss, expected_loss, 1e-5)
    assert_relative(vb, expected_vb, 1e-5)
    torch.testing.assert_close(loss, mse + vb, rtol=1e-6, atol=0)


def test_module_matches_functional():
    criterion = biasfast.nn.HybridLoss(SCHEDULE, "debias", "sample", return_terms=True)
    model_output, x_start, noise, timesteps = _inputs((6, 2, 9, 9), torch.float32)
    loss, mse, vb = criterion(model_output, x_start, noise, timesteps)
    weights = biasfast.weighting("debias", SCHEDULE, "sample")  # the module's table is for its prediction
    expected = biasfast.hybrid_loss(model_output, x_start, noise, timesteps, SCHEDULE, weights, prediction="sample",
                                    return_terms=True)
    assert all(torch.equal(a, b) for a, b in zip((loss, mse, vb), expected))
    assert "table" not in criterion.state_dict() and "debias" in repr(criterion)
    constant = biasfast.nn.HybridLoss(SCHEDULE, "constant")(model_output, x_start, noise, timesteps)
    assert torch.equal(constant, biasfast.hybrid_loss(model_output, x_start, noise, timesteps, SCHEDULE))


def _bad_v(value, row, element=3):
    model_output, x_start, noise, _ = _inputs((4, 3, 2, 2))
    model_output[row, 3:].view(-1)[element] = value
    return dict(model_output=model_output, x_start=x_start, noise=noise)


BAD_INPUTS = [
    (dict(model_output=torch.zeros(4, 5, 2, 2)), ValueError, "model_output: expected an even channel count.*got 5"),
    (dict(x_start=torch.zeros(4, 3, 2, 3)), ValueError, r"x_start: expected shape \(4, 3, 2, 2\)"),
    (dict(noise=torch.zeros(4, 3, 2, 2, dtype=torch.float64)), TypeError, "noise: dtype torch.float64"),
    (_bad_v(float("nan"), row=2), ValueError, "model_output.*variance channels v.*row 2 hold nan at element 3"),
    (_bad_v(float("inf"), row=1, element=0), ValueError, "model_output.*row 1 hold inf at element 0"),
    (dict(timesteps=torch.tensor([0, 1, 1000, 2])), ValueError, r"timesteps.*entry 2 is 1000, outside \[0, 1000\)"),
    (dict(timesteps=torch.tensor([0, -1, 3, 2])), ValueError, r"timesteps.*entry 1 is -1"),
    (dict(timesteps=torch.zeros(4)), TypeError, "timesteps: expected an integer tensor"),
    (dict(timesteps=torch.zeros(3, dtype=torch.long)), ValueError, r"timesteps: expected shape \(4,\)"),
    (dict(weights=torch.ones(999)), ValueError, r"weights: expected one weight per timestep, shape \(1000,\)"),
    (dict(weights=torch.full((T,), float("nan"))), ValueError, "weights.*entry 0 is nan"),
    (dict(prediction="v_prediction"), ValueError, "prediction: expected one of"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(schedule="linear"), TypeError, "schedule: expected a NoiseSchedule"),
    (dict(schedule=biasfast.NoiseSchedule("linear", T, zero_terminal_snr=True)), ValueError,
     "table.*must be finite"),
    (dict(x_start=torch.zeros(4, 3, 2, 2, requires_grad=True)), ValueError, "x_start: .*differentiable in "
     "model_output only"),
    (dict(model_output=[1.0]), TypeError, "model_output: expected a torch.Tensor"),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, match):
    model_output, x_start, noise, _ = _inputs((4, 3, 2, 2))
    args = dict(model_output=model_output, x_start=x_start, noise=noise, timesteps=torch.tensor([0, 1, 2, 999]),
                schedule=SCHEDULE, weights=DEBIAS)
    args.update(override)
    with pytest.raises(error, match=match):
        biasfast.hybrid_loss(**args)


@needs_triton
@pytest.mark.parametrize(
    "timesteps,weights,bad_v,match",
    [
        (torch.tensor([0, 1000]), DEBIAS, False, r"timesteps: entries must lie in \[0, 1000\)"),
        (torch.tensor([0, 1]), torch.full((T,), -1.0), False, "weights: entries must be finite and non-negative"),
        (torch.tensor([0, 1]), DEBIAS, True, "variance channels v"),
    ],
)
def test_triton_checks_values_without_a_host_sync(timesteps, weights, bad_v, match):
    # torch._assert_async: raises at once on CPU tensors, asynchronously (device assert) on a GPU.
    model_output, x_start, noise, _ = _inputs((2, 1, 2, 2))
    if bad_v:
        model_output[1, 1, 0, 0] = float("nan")
    raises_async_check(match, "hybrid_loss", "hybrid_loss", model_output, x_start, noise, timesteps, TABLE, weights,
                       "epsilon", "mean", False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_public_api_uses_triton_and_matches_reference(dtype):
    model_output, x_start, noise, timesteps = _inputs((6, 4, 33, 31), dtype, _edge_timesteps(6))
    out = model_output.cuda().requires_grad_()
    loss = biasfast.hybrid_loss(out, x_start.cuda(), noise.cuda(), timesteps.cuda(), SCHEDULE, DEBIAS.cuda())
    (grad,) = torch.autograd.grad(loss, out)
    expected_loss, _, _, expected_grad = _oracle(model_output, x_start, noise, timesteps, DEBIAS, "epsilon")
    assert_relative(loss.cpu(), expected_loss.mean(), 1e-5)
    assert_gradient_close(grad.cpu(), expected_grad / 6, dtype)
