"""`biasfast::knn_hamming`: the CPU kernel against the brute-force reference (every token dtype, k beyond 256,
index offsets, non-contiguous and streamed inputs), and the CUDA kernel against the CPU one (marked `gpu`: they
run only where a GPU is lent).

Hamming distances are exact integers, so every kernel must return the reference's distances and indices bit for
bit, ties (to the lower index) included.
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import biasfast
from biasfast.ops import reference


def test_opcheck():
    tokens = torch.randint(0, 4, (6, 9))
    torch.library.opcheck(torch.ops.biasfast.knn_hamming.default, (tokens, tokens, 2, 0, True))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 10), st.integers(1, 50), st.integers(1, 12), st.integers(2, 6), st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_hamming_matches_brute_force(nq, nr, length, vocab, seed, exclude_self):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, vocab, (nr, length), generator=g)
    query = ref.clone() if exclude_self else torch.randint(0, vocab, (nq, length), generator=g)
    assume(ref.shape[0] > int(exclude_self))
    k = min(3, ref.shape[0] - int(exclude_self))
    dist, index = biasfast.knn(query, ref, k=k, metric="hamming", exclude_self=exclude_self)
    expected_dist, expected_index = reference.knn_hamming(query, ref, k, exclude_self)
    assert torch.equal(dist, expected_dist.float())
    assert torch.equal(index, expected_index)  # integer distances: ties are exact, so indices are unique


def tokens(rows, length, vocab, dtype=torch.int64, generator=None):
    return torch.randint(0, vocab, (rows, length), generator=generator).to(dtype)


def expected_hamming(query, ref, k, offset=0, exclude_self=False):
    """reference.knn_hamming with the kernel's output types, its index offset and its padding when k exceeds
    the rows (distance inf, index -1, no offset)."""
    dist, index = reference.knn_hamming(query.long(), ref.long(), k, exclude_self)
    missing = k - dist.shape[1]
    return (torch.nn.functional.pad(dist.float(), (0, missing), value=float("inf")),
            torch.nn.functional.pad(index + offset, (0, missing), value=-1))


SHAPES = [(1, 1, 1, 2, 1), (13, 77, 70, 3, 5), (37, 300, 16, 2, 300), (9, 65, 33, 6, 257), (200, 1000, 128, 4, 10)]


@pytest.mark.parametrize("nq,nr,length,vocab,k", SHAPES)
@pytest.mark.parametrize("offset", [0, 1000])
def test_cpu_kernel_equals_the_reference(nq, nr, length, vocab, k, offset):
    # k = 257 and 300 go past the kernels' 256-entry fast list; vocab 2 makes many ties (lower index first).
    query, ref = tokens(nq, length, vocab), tokens(nr, length, vocab)
    dist, index = torch.ops.biasfast.knn_hamming(query, ref, k, offset, False)
    expected = expected_hamming(query, ref, k, offset)
    assert dist.dtype == torch.float32 and index.dtype == torch.int64
    assert torch.equal(dist, expected[0]) and torch.equal(index, expected[1])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.bool, torch.uint16])
def test_cpu_token_dtypes_and_exclude_self(dtype):
    ref = tokens(45, 21, 2 if dtype == torch.bool else 5, dtype)
    if dtype in (torch.int8, torch.int16, torch.int32):
        ref[::4] -= 3  # negative tokens compare like any other value
    ref[7] = ref[3]  # an exact duplicate stays visible with exclude_self
    dist, index = biasfast.knn(ref, ref, k=4, metric="hamming", exclude_self=True)
    expected = expected_hamming(ref, ref, 4, exclude_self=True)
    assert torch.equal(dist, expected[0]) and torch.equal(index, expected[1])
    assert index[3, 0].item() == 7 and dist[3, 0].item() == 0.0


def test_cpu_mixed_dtypes_non_contiguous_and_streaming():
    query = tokens(40, 30, 3, torch.int32)[::2, ::3]
    ref = tokens(30, 91, 3).t()[:, ::3]  # (91, 10), non-contiguous int64
    assert not query.is_contiguous() and not ref.is_contiguous()
    expected = expected_hamming(query, ref, 6)
    for target in (ref, [ref[:40], ref[40:]], [ref[:40].to(torch.int32), ref[40:].to(torch.int32)]):
        dist, index = biasfast.knn(query, target, k=6, metric="hamming")
        assert torch.equal(dist, expected[0]) and torch.equal(index, expected[1])


@pytest.mark.gpu
@pytest.mark.parametrize("nq,nr,length,vocab,k", SHAPES)
@pytest.mark.parametrize("offset", [0, 1000])
def test_hamming_equals_the_cpu_kernel(nq, nr, length, vocab, k, offset):
    # k = 257 and 300 take the global-memory list (beyond the shared-memory fast path); vocab 2 makes many ties.
    query, ref = tokens(nq, length, vocab), tokens(nr, length, vocab)
    expected = expected_hamming(query, ref, k, offset)
    got = torch.ops.biasfast.knn_hamming(query.cuda(), ref.cuda(), k, offset, False)
    assert got[0].device.type == "cuda" and got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.bool, torch.uint16])
def test_hamming_token_dtypes_and_exclude_self(dtype):
    ref = tokens(45, 21, 2 if dtype == torch.bool else 5, dtype)
    ref[7] = ref[3]  # an exact duplicate stays visible with exclude_self
    expected = biasfast.knn(ref, ref, k=4, metric="hamming", exclude_self=True)
    got = biasfast.knn(ref.cuda(), ref.cuda(), k=4, metric="hamming", exclude_self=True)
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    assert got[1][3, 0].item() == 7 and got[0][3, 0].item() == 0.0


@pytest.mark.gpu
def test_hamming_mixed_dtypes_non_contiguous_and_streaming():
    query = tokens(40, 30, 3, torch.int32)[::2, ::3]
    ref = tokens(30, 91, 3).t()[:, ::3]  # (91, 10), non-contiguous int64
    chunks = [ref[:40].cuda(), ref[40:].cuda()]
    expected = biasfast.knn(query, ref, k=6, metric="hamming")
    got = biasfast.knn(query.cuda(), chunks, k=6, metric="hamming")
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.gpu
def test_hamming_opcheck_and_bad_input():
    query = tokens(6, 9, 4).cuda()
    torch.library.opcheck(torch.ops.biasfast.knn_hamming.default, (query, query, 2, 0, True))
    with pytest.raises(ValueError, match="'query': hamming needs integer token tensors"):
        torch.ops.biasfast.knn_hamming(query.float(), query, 1, 0, False)
    with pytest.raises(ValueError, match="'ref': is on cpu but query is on cuda"):
        torch.ops.biasfast.knn_hamming(query, query.cpu(), 1, 0, False)
