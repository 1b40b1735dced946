"""biasfast::sqdist against the float64 reference: values, gradients, opcheck, torch.compile, bad input."""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from tests.conftest import devices
from tests.tolerances import assert_close_to_reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 13, 5), (33, 65, 17), (9, 130, 67), (3, 2, 1001)])
def test_matches_float64_reference(device, dtype, n, m, d):
    x = torch.randn(n, d, device=device).to(dtype)
    y = torch.randn(m, d, device=device).to(dtype)
    out = biasfast.sqdist(x, y)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (n, m)
    # The reference reads the same rounded inputs, and half/bfloat16 inputs give float32 results: only float32
    # rounding of the sums separates the two sides, so every non-float64 dtype gets the float32 tolerance.
    assert_close_to_reference(out, reference.sqdist(x.double(), y.double()), out.dtype, scale=d)


def test_exact_for_near_duplicates_with_large_offset():
    # The norm expansion loses everything here; direct differences must not.
    base = 1000.0 + torch.randn(20, 64, dtype=torch.float64)
    x = base + 1e-3 * torch.randn(20, 64, dtype=torch.float64)
    out = biasfast.sqdist(x.float(), base.float())
    expected = reference.sqdist(x.float().double(), base.float().double())
    diag = torch.arange(20)
    torch.testing.assert_close(out.double()[diag, diag], expected[diag, diag], rtol=1e-5, atol=0)
    assert torch.equal(biasfast.sqdist(base.float(), base.float()).diagonal(), torch.zeros(20))


def test_non_contiguous_inputs():
    x = torch.randn(40, 30)[::3, ::2]
    y = torch.randn(30, 30).t()[:, ::2]
    assert_close_to_reference(biasfast.sqdist(x, y), reference.sqdist(x.double(), y.double()), torch.float32, 15)


def test_gradcheck_float64():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.biasfast.sqdist, (x, y))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x = torch.randn(6, 9, device=device, requires_grad=True)
    y = torch.randn(11, 9, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.biasfast.sqdist.default, (x, y))
    torch.library.opcheck(torch.ops.biasfast.sqdist.default, (x.detach().double(), y.detach().double()))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def nearest(x, y):
        return biasfast.sqdist(x, y).min(dim=1)

    x, y = torch.randn(10, 8), torch.randn(21, 8)
    values, indices = nearest(x, y)
    expected = reference.sqdist(x.double(), y.double()).min(dim=1)
    torch.testing.assert_close(values.double(), expected.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, expected.indices)


@pytest.mark.parametrize(
    "x,y,error,match",
    [
        (torch.ones(3), torch.ones(2, 3), ValueError, "x: expected a 2-D"),
        (torch.ones(2, 3), torch.ones(2, 4), ValueError, "y: feature size 4"),
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "x: expected a floating-point"),
        ([[1.0]], torch.ones(1, 1), TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(x, y, error, match):
    with pytest.raises(error, match=match):
        biasfast.sqdist(x, y)


def test_empty_inputs_give_empty_results():
    assert biasfast.sqdist(torch.ones(0, 3), torch.ones(4, 3)).shape == (0, 4)
    assert torch.equal(biasfast.sqdist(torch.ones(2, 0), torch.ones(3, 0)), torch.zeros(2, 3))
