"""biasfast::row_hash against its NumPy reference: dtypes, odd shapes, -0.0, opcheck, torch.compile, bad input."""

import pytest
import torch

import biasfast
from biasfast.ops import reference
from tests.conftest import devices

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.uint8, torch.bool]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1), (7, 13), (65, 3), (3, 1001), (0, 5), (4, 0)])
def test_matches_reference(device, dtype, n, d):
    rows = (torch.randn(n, d) * 7).to(dtype).to(device)
    out = biasfast.row_hash(rows)
    assert out.dtype == torch.int64 and out.shape == (n,) and out.device == rows.device
    assert torch.equal(out.cpu(), reference.row_hash(rows))


def test_equal_rows_collide_and_distinct_rows_do_not():
    rows = torch.randn(500, 37)
    rows[17] = rows[3]
    rows[40] = rows[41].flip(0)  # a permutation is a different row
    rows[60, 5] = -0.0
    rows[61] = rows[60]
    rows[61, 5] = 0.0  # -0.0 == 0.0
    rows[70] = rows[71]
    rows[70, 36] = torch.nextafter(rows[71, 36], torch.tensor(10.0))  # one ulp apart
    hashes = biasfast.row_hash(rows)
    assert hashes[17] == hashes[3] and hashes[60] == hashes[61]
    assert hashes.unique().numel() == 498


def test_non_contiguous_rows():
    base = torch.randn(40, 30)
    view = base[::3, ::2]
    assert torch.equal(biasfast.row_hash(view), biasfast.row_hash(view.contiguous()))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    torch.library.opcheck(torch.ops.biasfast.row_hash.default, (torch.randn(6, 9, device=device),))
    torch.library.opcheck(torch.ops.biasfast.row_hash.default, (torch.randint(0, 5, (4, 3), device=device),))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def shared(x, y):
        return torch.isin(biasfast.row_hash(x), biasfast.row_hash(y))

    x, y = torch.randn(10, 8), torch.randn(21, 8)
    y[4] = x[7]
    assert shared(x, y).nonzero().flatten().tolist() == [7]


@pytest.mark.parametrize(
    "rows,error,match",
    [(torch.ones(3), ValueError, "rows: expected a 2-D"), ([[1.0]], TypeError, "rows: expected a torch.Tensor")],
)
def test_bad_input_names_the_argument(rows, error, match):
    with pytest.raises(error, match=match):
        biasfast.row_hash(rows)
