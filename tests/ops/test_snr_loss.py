"""The fused SNR-weighted loss (C++ CPU op and Triton op) against the float64 reference: values, gradients,
gradcheck, opcheck, torch.compile, determinism, the drop-in module, bad input."""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from tests.triton_backend import needs_triton, raises_async_check, triton_kernel
from tests.tolerances import assert_close_to_reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 5), (5, 3, 7, 9), (2, 1, 33, 65), (3, 20001), (2, 3, 129, 67)]  # 20001 > one 16384 chunk
TRITON_SHAPES = [(1, 1), (3, 5), (5, 3, 7, 9), (2, 1, 33, 65), (2, 17001)]  # 17001 > one 16 x 1024 chunk
REDUCTIONS = ["mean", "sum", "none"]
T = 1000
WEIGHTS = biasfast.weighting("debias", biasfast.NoiseSchedule("linear", T))



def fused(pred, target, timesteps, weights, reduction, compute_grad, implementation):
    op = torch.ops.biasfast.snr_loss if implementation == "cpp" else triton_kernel("snr_loss", "snr_loss")
    return op(pred, target, timesteps, weights, reduction, compute_grad)


IMPLEMENTATIONS = ["cpp", pytest.param("triton", marks=needs_triton)]


def _inputs(shape, dtype, requires_grad=False, num_weights=T):
    pred = torch.randn(shape).to(dtype).requires_grad_(requires_grad)
    target = torch.randn(shape).to(dtype)
    timesteps = torch.randint(0, num_weights, (shape[0],))
    return pred, target, timesteps


def _reference_gradient(pred, target, timesteps, weights, reduction):
    p = pred.detach().double().requires_grad_()
    loss = reference.snr_loss(p, target.double(), timesteps, weights.double(), reduction)
    (grad,) = torch.autograd.grad(loss.sum(), p)
    return loss.detach(), grad


def assert_gradient_close(actual, expected64, dtype):
    scale = expected64.abs().max().clamp(min=1e-30)  # gradients are O(w/N): compare relative to their size
    assert actual.dtype == dtype and actual.shape == expected64.shape
    assert_close_to_reference(actual.double() / scale, expected64 / scale, dtype)


CASES = [("cpp", s) for s in SHAPES] + [pytest.param("triton", s, marks=needs_triton) for s in TRITON_SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("implementation,shape", CASES)
def test_matches_float64_reference(implementation, dtype, shape):
    pred, target, timesteps = _inputs(shape, dtype)
    for reduction in REDUCTIONS:
        loss, mse, grad = fused(pred, target, timesteps, WEIGHTS, reduction, True, implementation)
        expected_loss, expected_grad = _reference_gradient(pred, target, timesteps, WEIGHTS, reduction)
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        assert loss.dtype == mse.dtype == accumulate
        # Inputs are exactly representable in float64: only the float32 accumulation differs.
        assert_close_to_reference(loss, expected_loss, accumulate, scale=expected_loss.abs().max().item())
        assert_close_to_reference(mse, reference.per_sample_mse(pred.double(), target.double()), accumulate)
        assert_gradient_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_public_api_gradients_for_pred_and_target(reduction):
    pred, target, timesteps = _inputs((4, 3, 11, 13), torch.float32, requires_grad=True)
    target.requires_grad_(True)
    upstream = torch.rand(4) if reduction == "none" else torch.tensor(0.37)
    loss, mse = biasfast.snr_weighted_loss(pred, target, timesteps, WEIGHTS, reduction, return_per_sample=True)
    grad_pred, grad_target = torch.autograd.grad(loss, (pred, target), upstream)
    p, q = pred.detach().double().requires_grad_(), target.detach().double().requires_grad_()
    expected = reference.snr_loss(p, q, timesteps, WEIGHTS, reduction)
    expected_pred, expected_target = torch.autograd.grad(expected, (p, q), upstream.double())
    assert_close_to_reference(loss, expected.detach(), torch.float32, scale=expected.abs().max().item())
    assert not mse.requires_grad
    assert_gradient_close(grad_pred, expected_pred, torch.float32)
    assert_gradient_close(grad_target, expected_target, torch.float32)


def test_unit_upstream_gradient_is_returned_without_a_rescale_pass():
    pred, target, timesteps = _inputs((3, 40), torch.float32, requires_grad=True)
    loss, _, grad = torch.ops.biasfast.snr_loss(pred, target, timesteps, WEIGHTS, "mean", True)
    (grad_pred,) = torch.autograd.grad(loss, pred)
    assert grad_pred.data_ptr() == grad.data_ptr()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, reduction):
    pred, target, timesteps = (t.to(device) for t in _inputs((2, 3), torch.float64, num_weights=4))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    weights = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)

    def loss(p, q, w):  # the op's one autograd formula, over the CPU kernel or (on CUDA) the Triton kernel
        return torch.ops.biasfast.snr_loss(p, q, timesteps, w, reduction, True)[0]

    assert torch.autograd.gradcheck(loss, (pred, target, weights))


def test_gradcheck_public_api_with_repeated_timesteps():
    pred, target, _ = _inputs((5, 4), torch.float64, requires_grad=True, num_weights=3)
    timesteps = torch.tensor([0, 2, 0, 0, 2])
    weights = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, w: biasfast.snr_weighted_loss(p, target, timesteps, w), (pred, weights))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, reduction):
    op = torch.ops.biasfast.snr_loss.default
    pred, target, timesteps = (t.to(device) for t in _inputs((3, 4, 5), torch.float32))
    pred.requires_grad_(True)
    weights = WEIGHTS.to(device)
    torch.library.opcheck(op, (pred, target, timesteps, weights.float(), reduction, True))
    args = (pred.detach().bfloat16(), target.bfloat16(), timesteps.int(), weights, reduction, False)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_and_backward():
    criterion = biasfast.nn.SNRWeightedLoss(biasfast.NoiseSchedule("linear", T))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(pred, target, timesteps):
        return criterion(pred * 2, target, timesteps)

    pred, target, timesteps = _inputs((4, 3, 8, 8), torch.float32, requires_grad=True)
    loss = step(pred, target, timesteps)
    loss.backward()
    p = pred.detach().double().requires_grad_()
    expected = reference.snr_loss(p * 2, target.double(), timesteps, WEIGHTS)
    expected.backward()
    assert_close_to_reference(loss, expected.detach(), torch.float32, scale=expected.item())
    assert_gradient_close(pred.grad, p.grad, torch.float32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bitwise(implementation, dtype):
    shape = (3, 70001) if implementation == "cpp" else (2, 20001)
    pred, target, timesteps = _inputs(shape, dtype)
    first = [t.clone() for t in fused(pred, target, timesteps, WEIGHTS, "mean", True, implementation)]
    for _ in range(3):
        again = fused(pred, target, timesteps, WEIGHTS, "mean", True, implementation)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_same_bits_with_any_thread_count():
    pred, target, timesteps = _inputs((5, 3, 90, 91), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(pred, target, timesteps, WEIGHTS, "sum", True, "cpp")
        torch.set_num_threads(max(2, threads))
        many = fused(pred, target, timesteps, WEIGHTS, "sum", True, "cpp")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_no_grad_gives_the_same_loss_and_no_gradient():
    pred, target, timesteps = _inputs((3, 3, 40, 41), torch.float32, requires_grad=True)
    loss_grad, mse_grad, _ = fused(pred, target, timesteps, WEIGHTS, "mean", True, "cpp")
    with torch.no_grad():
        loss, mse = biasfast.snr_weighted_loss(pred, target, timesteps, WEIGHTS, return_per_sample=True)
    assert torch.equal(loss, loss_grad) and torch.equal(mse, mse_grad)
    assert fused(pred, target, timesteps, WEIGHTS, "mean", False, "cpp")[2].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_inputs_use_streaming_stores_correctly(dtype):
    # Past 8 MiB of gradient the CPU kernel writes with non-temporal stores.
    pred, target, timesteps = _inputs((3, 1_500_007), dtype)
    loss, _, grad = fused(pred, target, timesteps, WEIGHTS, "mean", True, "cpp")
    expected_loss, expected_grad = _reference_gradient(pred, target, timesteps, WEIGHTS, "mean")
    assert_close_to_reference(loss, expected_loss, torch.float32, scale=expected_loss.item())
    assert_gradient_close(grad, expected_grad, dtype)


def test_recycled_gradient_buffer_never_overwrites_a_live_gradient():
    pred, target, timesteps = _inputs((2, 3, 64, 64), torch.float32, requires_grad=True)
    (kept,) = torch.autograd.grad(biasfast.snr_weighted_loss(pred, target, timesteps, WEIGHTS), pred)
    snapshot = kept.clone()
    for _ in range(2):
        (fresh,) = torch.autograd.grad(biasfast.snr_weighted_loss(pred * 3, target, timesteps, WEIGHTS), pred)
        assert fresh.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, snapshot)


def test_module_matches_functional_with_the_weighting_table():
    schedule = biasfast.NoiseSchedule("cosine", T)
    criterion = biasfast.nn.SNRWeightedLoss(schedule, "min_snr", "v_prediction", gamma=3.0, return_per_sample=True)
    pred, target, timesteps = _inputs((6, 2, 9, 9), torch.float32)
    table = biasfast.weighting("min_snr", schedule, "v_prediction", gamma=3.0)
    loss, mse = criterion(pred, target, timesteps)
    assert torch.equal(loss, biasfast.snr_weighted_loss(pred, target, timesteps, table))
    assert mse.shape == (6,)
    assert "weights" not in criterion.state_dict()
    assert "min_snr" in repr(criterion)


BAD_INPUTS = [
    (dict(target=torch.zeros(4, 3, 5)), ValueError, r"target: shape \(4, 3, 5\) does not match pred's \(4, 3, 4\)"),
    (dict(target=torch.zeros(4, 3, 4, dtype=torch.float64)), TypeError, "target: dtype torch.float64"),
    (dict(timesteps=torch.zeros(4)), TypeError, "timesteps: expected an integer tensor"),
    (dict(timesteps=torch.zeros(3, dtype=torch.long)), ValueError, r"timesteps: expected shape \(4,\)"),
    (dict(timesteps=torch.tensor([0, 1, 1000, 2])), ValueError, r"timesteps.*entry 2 is 1000, outside \[0, 1000\)"),
    (dict(timesteps=torch.tensor([0, -1, 3, 2])), ValueError, r"timesteps.*entry 1 is -1"),
    (dict(weights=torch.tensor([1.0, float("nan")])), ValueError, "weights.*entry 1 is nan"),
    (dict(weights=torch.tensor([1.0, 2.0, float("inf")])), ValueError, "weights.*entry 2 is inf"),
    (dict(weights=torch.tensor([1.0, -0.5, 1.0])), ValueError, "weights.*entry 1 is negative"),
    (dict(weights=torch.ones(2, 3)), ValueError, "weights: expected a non-empty 1-D table"),
    (dict(weights=torch.ones(3, dtype=torch.long)), TypeError, "weights: expected a floating-point tensor"),
    (dict(pred=torch.zeros(4, 3, 4, dtype=torch.long)), TypeError, "pred: expected a floating-point tensor"),
    (dict(pred=torch.zeros(0, 3), target=torch.zeros(0, 3)), ValueError, "pred: expected a .batch, .... tensor"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(weights=torch.ones(3, device="meta")), ValueError, "one device.*weights on meta"),
    (dict(pred=[1.0]), TypeError, "pred: expected a torch.Tensor"),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS)
def test_bad_input_names_the_argument(override, error, match):
    args = dict(pred=torch.zeros(4, 3, 4), target=torch.zeros(4, 3, 4), timesteps=torch.tensor([0, 1, 2, 0]),
                weights=torch.ones(3 if "timesteps" not in override else T), reduction="mean")
    args.update(override)
    with pytest.raises(error, match=match):
        biasfast.snr_weighted_loss(**args)


@needs_triton
@pytest.mark.parametrize(
    "timesteps,weights,match",
    [
        (torch.tensor([0, 5]), torch.ones(3), r"timesteps: entries must lie in \[0, 3\)"),
        (torch.tensor([0, 1]), torch.tensor([1.0, float("nan"), 1.0]), "weights: entries must be finite"),
        (torch.tensor([0, 1]), torch.tensor([1.0, -1.0, 1.0]), "non-negative"),
    ],
)
def test_triton_checks_values_without_a_host_sync(timesteps, weights, match):
    # torch._assert_async: raises at once on CPU tensors, asynchronously (device assert) on a GPU.
    raises_async_check(match, "snr_loss", "snr_loss", torch.zeros(2, 3), torch.zeros(2, 3), timesteps, weights, "mean",
                       False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_public_api_uses_triton_and_matches_reference(dtype):
    pred, target, timesteps = (x.cuda() for x in _inputs((6, 4, 33, 31), dtype))
    pred.requires_grad_(True)
    loss = biasfast.snr_weighted_loss(pred, target, timesteps, WEIGHTS.cuda())
    (grad,) = torch.autograd.grad(loss, pred)
    expected_loss, expected_grad = _reference_gradient(pred.cpu(), target.cpu(), timesteps.cpu(), WEIGHTS, "mean")
    assert_close_to_reference(loss, expected_loss, torch.float32, scale=expected_loss.item())
    assert_gradient_close(grad, expected_grad.cuda(), dtype)
