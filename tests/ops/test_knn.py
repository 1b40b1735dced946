"""biasfast.knn / pairwise_distances against a float64 brute force: properties, streaming, opcheck, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import biasfast
from biasfast._core import extension
from biasfast.ops import reference
from tests.cpu_features import CPU_VARIANTS, cpu_has_avx2

FLOAT_METRICS = ["l2", "sqeuclidean", "cosine", "pearson"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
RTOL = 1e-6  # distances of float32 results against the float64 brute force
RTOL64 = 1e-12  # float64 results: only float64 rounding separates kernel and brute force


def assert_exact_knn(dist, index, query, ref, k, metric, exclude_self=False, rtol=None):
    """Neighbour sets equal the float64 brute force up to genuine ties; distances within `rtol` (default RTOL, RTOL64
    for float64 results); ties to lower index."""
    if rtol is None:
        rtol = RTOL64 if dist.dtype == torch.float64 else RTOL
    q64 = query.reshape(query.shape[0], -1)
    r64 = ref.reshape(ref.shape[0], -1)
    q64, r64 = (q64.double(), r64.double()) if metric != "hamming" else (q64, r64)
    # The oracle in row chunks (the broadcast reference needs nq·nr·d floats).
    full = torch.cat([reference.pairwise_distances(q64[i : i + 8], r64, metric) for i in range(0, len(q64), 8)])
    full = full.double()
    if exclude_self:
        full[torch.arange(full.shape[0]), torch.arange(full.shape[0])] = float("inf")
    expected = full.sort(dim=1).values[:, :k]
    assert dist.shape == index.shape == (query.shape[0], k)
    assert index.dtype == torch.int64
    torch.testing.assert_close(dist.double(), expected.double(), rtol=rtol, atol=1e-12)
    assert torch.all(dist[:, 1:] >= dist[:, :-1]), "distances must be sorted ascending"
    true_of_returned = full.gather(1, index)
    torch.testing.assert_close(true_of_returned, dist.double(), rtol=rtol, atol=1e-12)
    _, group_of = torch.unique(r64, dim=0, return_inverse=True)
    groups: dict[int, list[int]] = {}
    for j, g in enumerate(group_of.tolist()):
        groups.setdefault(g, []).append(j)
    for row in range(full.shape[0]):
        chosen = set(index[row].tolist())
        assert len(chosen) == k, "indices must be distinct"
        kth = float(expected[row, -1])
        better = (full[row] < kth * (1 - 2 * rtol) - 1e-12).nonzero().flatten().tolist()
        assert set(better) <= chosen, f"row {row}: missed a strictly nearer reference"
        # Ties between identical references (exact duplicates) go to the lower index.
        for j in chosen:
            twins = groups[int(group_of[j])]
            skipped = [t for t in twins if t < j and t not in chosen and not (exclude_self and t == row)]
            assert not skipped, f"row {row}: returned {j} but not its lower-index duplicate {skipped[0]}"


@st.composite
def knn_problems(draw):
    nq = draw(st.integers(1, 12))
    nr = draw(st.integers(1, 40))
    d = draw(st.integers(1, 24))
    metric = draw(st.sampled_from(FLOAT_METRICS))
    dtype = draw(st.sampled_from(DTYPES))
    exclude_self = draw(st.booleans())
    if exclude_self:
        nr = nq = max(nq, 2)
    k = draw(st.integers(1, nr - int(exclude_self)))
    seed = draw(st.integers(0, 2**31 - 1))
    style = draw(st.sampled_from(["normal", "offset", "grid", "duplicates"]))
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(nr, d, generator=g, dtype=torch.float64)
    if style == "offset":  # large common offset: the norm expansion alone would lose everything
        ref = 1000 + 1e-3 * ref
    elif style == "grid":  # small integers: many exact ties
        ref = torch.randint(-2, 3, (nr, d), generator=g).double()
    query = ref.clone() if exclude_self else torch.randn(nq, d, generator=g, dtype=torch.float64)
    if style == "offset" and not exclude_self:
        query = 1000 + 1e-3 * query
    elif style == "grid" and not exclude_self:
        query = torch.randint(-2, 3, (nq, d), generator=g).double()
    elif style == "duplicates":
        rows = torch.randint(0, nr, (max(1, nr // 3),), generator=g)
        ref[rows] = ref[rows[:1]]  # a block of exact duplicates
        if not exclude_self:
            query[: min(nq, 2)] = ref[rows[0]]
        else:
            query = ref.clone()
    return query.to(dtype), ref.to(dtype), k, metric, exclude_self


def undefined_for_metric(x: torch.Tensor, metric: str) -> bool:
    x = x.double()
    if metric == "pearson":
        x = x - x.mean(dim=1, keepdim=True)
    return metric in ("cosine", "pearson") and bool((x.norm(dim=1) <= 1e-300).any())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(knn_problems())
def test_matches_float64_brute_force(problem):
    query, ref, k, metric, exclude_self = problem
    assume(not undefined_for_metric(query, metric) and not undefined_for_metric(ref, metric))
    dist, index = biasfast.knn(query, ref, k=k, metric=metric, exclude_self=exclude_self)
    assert dist.dtype == (torch.float64 if query.dtype == torch.float64 else torch.float32)
    assert_exact_knn(dist, index, query, ref, k, metric, exclude_self)


def test_large_offset_near_duplicates_and_exact_duplicates():
    base = 1000 + 1e-3 * torch.randn(400, 64, dtype=torch.float64)
    ref = torch.cat([base, base[:50]]).float()  # rows 400.. duplicate rows 0..49
    query = (base[::7] + 1e-5 * torch.randn(base[::7].shape, dtype=torch.float64)).float()
    for metric in FLOAT_METRICS:
        dist, index = biasfast.knn(query, ref, k=4, metric=metric)
        assert_exact_knn(dist, index, query, ref, 4, metric)
    dist, index = biasfast.knn(ref, ref, k=2, exclude_self=True)
    assert torch.equal(dist[:50, 0], torch.zeros(50)) and torch.equal(index[:50, 0], torch.arange(400, 450))
    assert torch.equal(index[400:, 0], torch.arange(50)), "self excluded by index, duplicate kept"


def test_certification_fallback_with_many_ties():
    # 200 identical references and k = 5: approximate distances cannot separate them; results must still be exact.
    ref = torch.cat([torch.ones(200, 32) * 3.0, torch.randn(100, 32)])
    query = torch.ones(3, 32) * 3.0 + 1e-4
    dist, index = biasfast.knn(query, ref, k=5)
    assert torch.equal(index, torch.arange(5).repeat(3, 1))
    assert_exact_knn(dist, index, query, ref, 5, "l2")


@pytest.mark.parametrize("workspace_mb", [1, 256])
def test_rechecks_then_brute_force_find_neighbours_the_rounding_hides(workspace_mb):
    # 3000 references a few ulps apart: float32 cosine candidates cannot rank them, so the first pass misses the
    # true neighbours. Rechecks widen the heaps 4× per round, up to every reference (256 MB), or until 40 queries'
    # heaps outgrow the workspace (1 MB) and brute force takes over; either way the answer is exact.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 8, generator=g, dtype=torch.float64)
    ref = (base * (1 + 1e-6 * torch.randn(3000, 8, generator=g, dtype=torch.float64))).float()
    query = (base + 1e-3 * torch.randn(40, 8, generator=g, dtype=torch.float64)).float()
    dist, index = biasfast.knn(query, ref, k=5, metric="cosine", workspace_mb=workspace_mb)
    assert_exact_knn(dist, index, query, ref, 5, "cosine")


@pytest.mark.parametrize("d", [20, 300])  # the fused and the packed kernel
def test_rows_whose_squares_overflow_float32_are_still_exact(d):
    # ‖y‖² ≈ 1e41 overflows float32: the candidates are garbage (inf, NaN), the rounding bound is infinite, so
    # nothing is certified and every query must end in an exact search. (A sqeuclidean answer would overflow
    # float32 itself; cosine and pearson normalise the rows in float64 first.)
    g = torch.Generator().manual_seed(11)
    query, ref = 1e20 * torch.randn(37, d, generator=g), 1e20 * torch.randn(301, d, generator=g)
    dist, index = biasfast.knn(query, ref, k=3, metric="l2")
    assert_exact_knn(dist, index, query, ref, 3, "l2")


@pytest.mark.parametrize("d", [24, 300])  # the fused (d ≤ 256) and the packed kernel
@pytest.mark.parametrize("metric", FLOAT_METRICS)
def test_recheck_of_near_ties_keeps_self_exclusion_by_index(metric, d):
    # Scattered rows with fifteen exact copies each tie beyond the first pass's extra candidates (k + 8), so those
    # queries are searched again with more: each must still exclude its own row, by its index in the full set.
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(300, d, generator=g)
    for i, source in enumerate((7, 101, 250)):
        ref[torch.arange(20 + i, 300, 20)] = ref[source].clone()
    for dtype in (torch.float32, torch.float16, torch.float64):
        query = ref.to(dtype)
        dist, index = biasfast.knn(query, query, k=3, metric=metric, exclude_self=True)
        assert_exact_knn(dist, index, query, query, 3, metric, exclude_self=True)
        assert set(index[80].tolist()) == {7, 20, 40}, "copies of row 7, lowest indices first, row 80 excluded"


@pytest.mark.parametrize("metric", FLOAT_METRICS)
def test_larger_problem_spans_many_tiles(metric):
    query, ref = torch.randn(90, 67), torch.randn(3001, 67)
    ref[1234] = query[17]
    dist, index = biasfast.knn(query, ref, k=7, metric=metric, workspace_mb=1)
    assert_exact_knn(dist, index, query, ref, 7, metric)


@pytest.mark.parametrize(
    "nq,nr,d,k,workspace_mb",
    [
        (13, 1100, 300, 3, 256),  # few queries: references split among threads, heaps merged
        (150, 301, 513, 10, 256),  # two query blocks; d not a multiple of the depth block
        (49, 200, 1030, 4, 1),  # many reference tiles; partial 6-query panel
    ],
)
def test_large_feature_sizes_packed_path(nq, nr, d, k, workspace_mb):
    # d > 256 takes the cache-blocked packed kernel (float32, AVX2) or the BLAS; near-duplicates on a large offset.
    query = 1000 + 1e-3 * torch.randn(nq, d, dtype=torch.float64)
    ref = 1000 + 1e-3 * torch.randn(nr, d, dtype=torch.float64)
    ref[nr - 5] = query[nq // 2] + 1e-7
    ref[nr - 3] = ref[nr - 5]
    dist, index = biasfast.knn(query.float(), ref.float(), k=k, workspace_mb=workspace_mb)
    assert_exact_knn(dist, index, query.float(), ref.float(), k, "l2")
    assert index[nq // 2, 0] == nr - 5
    dist, index = biasfast.knn(ref[:nq].float(), ref[:nq].float(), k=2, metric="cosine", exclude_self=True)
    assert_exact_knn(dist, index, ref[:nq].float(), ref[:nq].float(), 2, "cosine", exclude_self=True)


def test_streaming_equals_in_memory_with_global_indices():
    query, ref = torch.randn(29, 33), torch.randn(1001, 33)
    ref[900] = query[3]
    expected = biasfast.knn(query, ref, k=6, metric="l2")
    chunks = [ref[i : i + 97] for i in range(0, ref.shape[0], 97)]
    streamed = biasfast.knn(query, iter(chunks), k=6, metric="l2")
    assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    assert streamed[1][3, 0] == 900


def test_streaming_exclude_self_and_small_chunks():
    x = torch.randn(40, 5)
    x[10] = x[30]
    expected = biasfast.knn(x, x, k=3, exclude_self=True)
    streamed = biasfast.knn(x, (x[i : i + 2] for i in range(0, 40, 2)), k=3, exclude_self=True)
    assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    assert streamed[1][10, 0] == 30 and streamed[1][30, 0] == 10


def test_numpy_memmap_and_leading_shapes(tmp_path):
    images = np.random.default_rng(0).standard_normal((50, 3, 4, 5)).astype(np.float32)
    path = tmp_path / "ref.npy"
    np.save(path, images)
    ref = np.load(path, mmap_mode="r")
    query = torch.from_numpy(images[:7].copy()) + 1e-3
    dist, index = biasfast.knn(query, ref, k=2)
    assert torch.equal(index[:, 0], torch.arange(7))
    assert_exact_knn(dist, index, query, torch.from_numpy(images), 2, "l2")
    streamed = biasfast.knn(query, (ref[i : i + 16] for i in range(0, 50, 16)), k=2)
    assert torch.equal(streamed[1], index)


@pytest.mark.parametrize("metric", FLOAT_METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_distinct_rows_at_equal_distance_go_to_the_lower_index(metric, dtype):
    # Balanced ±1 rows of 16 values: q, tied rows that swap one +1 and one −1 of q (Hamming distance 2, so one
    # distance under every float metric), and farther rows (random balanced rows at Hamming distance ≥ 4). Means
    # are 0 and norms 4, so every dtype and any summation order gives the tied rows bit-identical distances.
    # They sit at scattered indices; the k nearest must be the k lowest indices of the tied group, in order.
    g = torch.Generator().manual_seed(2)
    base = torch.tensor([1.0] * 8 + [-1.0] * 8)
    query = base.repeat(3, 1)
    ref = -base.repeat(37, 1)  # Hamming distance 16 from q
    for row in range(37):
        candidate = base[torch.randperm(16, generator=g)]
        if candidate.ne(base).sum() >= 4:
            ref[row] = candidate
    tied_at = [19, 4, 11, 30, 7, 23, 15]
    for i, row in enumerate(tied_at):
        ref[row] = base
        ref[row, i], ref[row, 8 + (3 * i) % 8] = -1, 1
    for k in (1, 3, len(tied_at)):
        dist, index = biasfast.knn(query.to(dtype), ref.to(dtype), k=k, metric=metric)
        assert index.tolist() == [sorted(tied_at)[:k]] * 3, (k, dist)
        assert torch.all(dist == dist[0, 0])


def test_non_contiguous_and_mixed_dtypes():
    query = torch.randn(40, 30)[::3, ::2]
    ref = torch.randn(30, 70).t()[:, ::2].to(torch.float16)
    dist, index = biasfast.knn(query, ref, k=3)
    assert_exact_knn(dist, index, query, ref, 3, "l2")


@pytest.mark.parametrize("metric", FLOAT_METRICS + ["hamming"])
def test_pairwise_distances(metric):
    if metric == "hamming":
        x, y = torch.randint(0, 3, (9, 11)), torch.randint(0, 3, (13, 11))
    else:
        x, y = torch.randn(9, 2, 6), torch.randn(13, 12)
    out = biasfast.pairwise_distances(x, y, metric)
    x64, y64 = (x, y) if metric == "hamming" else (x.double(), y.double())
    expected = reference.pairwise_distances(x64, y64, metric)
    assert out.dtype == torch.float32 and out.shape == (9, 13)
    torch.testing.assert_close(out.double(), expected.double(), rtol=1e-5, atol=1e-6)
    if metric != "hamming":
        assert biasfast.pairwise_distances(x.double(), y, metric).dtype == torch.float64


def test_opcheck():
    query, ref = torch.randn(5, 7), torch.randn(11, 7)
    torch.library.opcheck(torch.ops.biasfast.knn.default, (query, ref, 3, "l2", 0, False, 16))
    torch.library.opcheck(torch.ops.biasfast.knn.default, (query.double(), ref, 2, "pearson", 5, False, 16))
    torch.library.opcheck(torch.ops.biasfast.knn.default, (ref, ref, 2, "cosine", 0, True, 16))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def nearest(q, r):
        return biasfast.knn(q, r, k=2, metric="cosine")

    query, ref = torch.randn(10, 8), torch.randn(21, 8)
    dist, index = nearest(query, ref)
    assert_exact_knn(dist, index, query, ref, 2, "cosine")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(query=torch.ones(2, 3), ref=torch.ones(4, 5)), ValueError, "ref: feature size 5"),
        (dict(k=0), ValueError, "k: must be at least 1"),
        (dict(k=2.0), TypeError, "k: expected an int"),
        (dict(k=12), ValueError, r"k: 12 is larger than the number of eligible references \(11\)"),
        (dict(k=11, exclude_self=True, query=torch.randn(11, 3)), ValueError, r"eligible references \(10\)"),
        (dict(query=torch.ones(0, 3)), ValueError, "query: is empty"),
        (dict(ref=torch.ones(0, 3)), ValueError, "ref: is empty"),
        (dict(query=torch.ones(3)), ValueError, "query: expected"),
        (dict(metric="manhattan"), ValueError, "metric: unknown metric 'manhattan'"),
        (dict(metric="hamming"), TypeError, "query: metric 'hamming' needs integer"),
        (dict(query=torch.ones(2, 3, dtype=torch.int64)), TypeError, "query: metric 'l2' needs float"),
        (dict(ref=[[1.0, 2.0, 3.0]]), TypeError, r"ref \(chunk 0\): expected a torch.Tensor"),
        (dict(ref=iter([])), ValueError, "ref: the iterable of chunks is empty"),
        (dict(ref=5), TypeError, "ref: expected a tensor, numpy array or iterable"),
        (dict(exclude_self=True), ValueError, "exclude_self: query and ref must be the same set"),
        (dict(workspace_mb=0), ValueError, "workspace_mb: must be a positive int"),
        (dict(query=torch.zeros(2, 3), metric="cosine"), ValueError, "query.*row 0 has zero norm"),
        (dict(ref=torch.ones(11, 3), metric="pearson"), ValueError, "ref.*row 0 is constant"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(query=torch.randn(2, 3), ref=torch.randn(11, 3), k=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        biasfast.knn(**args)


@pytest.mark.parametrize("isa", CPU_VARIANTS)
def test_workspace_too_small_for_the_feature_size(isa, monkeypatch):
    # Every path keeps its tiles inside workspace_mb or says why not: AVX2's packed kernel a 16-row tile per thread
    # plus its partial sums, the portable BLAS path 16 references with their inner products.
    monkeypatch.setenv("BIASFAST_CPU_ISA", isa)
    with pytest.raises(ValueError, match=r"workspace_mb.*too small for feature size 40000"):
        biasfast.knn(torch.randn(4, 40000), torch.randn(40, 40000), workspace_mb=1)
    assert extension.cpu_variants_ran()["knn"] == isa
    query, ref = torch.randn(4, 9000), torch.randn(40, 9000)
    dist, index = biasfast.knn(query, ref, k=3, workspace_mb=4)
    assert_exact_knn(dist, index, query, ref, 3, "l2")


@pytest.mark.skipif(not cpu_has_avx2(), reason="the fused kernel is AVX2-only")
def test_workspace_bounds_the_fused_tiles_of_many_lanes(monkeypatch):
    # 64 lanes (a 64-core machine) of 256 KB L2 tiles would take 16 MB: at 1 MB not even 16 rows per lane fit (an
    # error), at 8 MB the tiles shrink to fit and the answer stays exact.
    monkeypatch.setenv("BIASFAST_CPU_ISA", "avx2")
    threads = torch.get_num_threads()
    torch.set_num_threads(64)
    try:
        query, ref = torch.randn(7, 256), torch.randn(2000, 256)
        with pytest.raises(ValueError, match=r"workspace_mb.*too small for feature size 256 .* 64 lanes"):
            biasfast.knn(query, ref, k=3, workspace_mb=1)
        dist, index = biasfast.knn(query, ref, k=3, workspace_mb=8)
    finally:
        torch.set_num_threads(threads)
    assert_exact_knn(dist, index, query, ref, 3, "l2")


def test_nan_and_inf_name_the_tensor_and_first_bad_row():
    query, ref = torch.randn(4, 3), torch.randn(3000, 3)
    ref[2100, 1] = float("nan")
    ref[2500, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 2100\)"):
        biasfast.knn(query, ref)
    with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 2100\)"):
        biasfast.knn(query, iter([ref[:2000], ref[2000:]]))
    wide = torch.randn(3000, 300)  # the packed path: reference ranges split among threads
    wide[2500, 7] = float("nan")
    wide[900, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 900\)"):
        biasfast.knn(torch.randn(4, 300), wide)
    many_tiles = torch.randn(5000, 517)  # tiles claimed by lanes in turn: the reported row is still the first
    for row in (4990, 3333, 1777):
        many_tiles[row, row % 517] = float("nan")
    with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 1777\)"):
        biasfast.knn(torch.randn(20, 517), many_tiles, workspace_mb=1)
    query[2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"query.*NaN or Inf \(first bad row 2\)"):
        biasfast.knn(query, ref[:10])
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first bad row 2\)"):
        biasfast.pairwise_distances(query, ref[:10])


@pytest.mark.parametrize("metric", ["cosine", "pearson"])
def test_standardised_metrics_leave_the_inputs_alone(metric):
    # cosine / pearson transform a float64 copy of the queries in place: never the caller's tensor.
    query = torch.randn(37, 301, dtype=torch.float64) + 3.0
    ref = torch.randn(211, 301) + 3.0
    query_before, ref_before = query.clone(), ref.clone()
    dist, index = biasfast.knn(query, ref, k=4, metric=metric)
    assert torch.equal(query, query_before) and torch.equal(ref, ref_before)
    assert_exact_knn(dist, index, query, ref.double(), 4, metric)


def test_undefined_rows_name_the_first_one():
    query = torch.randn(500, 40)  # query rows are prepared in parallel: the message names the least bad row
    query[[431, 97, 250]] = 3.0
    with pytest.raises(ValueError, match=r"query.*row 97 is constant"):
        biasfast.knn(query, torch.randn(30, 40), metric="pearson")
    ref = torch.randn(4000, 300)  # many tiles claimed by the lanes; a constant row before a NaN row
    ref[3100, 5] = float("nan")
    ref[[3500, 2222]] = -1.5
    with pytest.raises(ValueError, match=r"ref.*row 2222 is constant"):
        biasfast.knn(torch.randn(8, 300), ref, metric="pearson", workspace_mb=2)
    ref[1000, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 1000\)"):
        biasfast.knn(torch.randn(8, 300), ref, metric="pearson", workspace_mb=2)


def test_tensors_on_different_devices():
    meta = torch.randn(5, 3, device="meta")
    with pytest.raises(ValueError, match="ref: is on meta but query is on cpu"):
        biasfast.knn(torch.randn(2, 3), meta)


# ---- the CUDA kernel (skipped without a GPU): the CPU kernel and the float64 brute force are the oracles ----

CUDA_SHAPES = [(1, 1, 1, 1), (13, 77, 5, 3), (37, 300, 24, 10), (9, 400, 300, 257), (200, 1000, 33, 300)]


def cuda_rtol(dtype: torch.dtype, d: int) -> float:
    """The CUDA kernel sums d squared differences in its accumulate type without a float64 re-rank: d roundings."""
    return 2 * d * (2.0**-53 if dtype == torch.float64 else 2.0**-24) + (RTOL64 if dtype == torch.float64 else RTOL)


@pytest.mark.gpu
@pytest.mark.parametrize("nq,nr,d,k", CUDA_SHAPES)
@pytest.mark.parametrize("metric", FLOAT_METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_the_cpu_kernel_and_brute_force(nq, nr, d, k, metric, dtype):
    if metric == "pearson" and d == 1:
        pytest.skip("every row of one feature is constant: pearson is undefined (an error, tested below)")
    g = torch.Generator().manual_seed(nq + nr + d)
    query = torch.randn(nq, d, generator=g).to(dtype)
    ref = torch.cat([torch.randn(nr - nr // 4, d, generator=g), query[: nr // 4].float()]).to(dtype)  # duplicates
    nr, k = ref.shape[0], min(k, ref.shape[0])
    rtol = cuda_rtol(torch.float64 if dtype == torch.float64 else torch.float32, d)
    for offset in (0, 1000):
        dist, index = torch.ops.biasfast.knn(query.cuda(), ref.cuda(), k, metric, offset, False, 64)
        assert dist.device.type == "cuda" and index.dtype == torch.int64
        assert_exact_knn(dist.cpu(), index.cpu() - offset, query, ref, k, metric, rtol=rtol)
        cpu_dist, _ = torch.ops.biasfast.knn(query, ref, k, metric, offset, False, 64)
        torch.testing.assert_close(dist.cpu().double(), cpu_dist.double(), rtol=rtol, atol=1e-6)
    if nr > 1:
        self_dist, self_index = torch.ops.biasfast.knn(ref.cuda(), ref.cuda(), min(k, nr - 1), metric, 0, True, 64)
        assert_exact_knn(self_dist.cpu(), self_index.cpu(), ref, ref, min(k, nr - 1), metric, exclude_self=True,
                         rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", FLOAT_METRICS)
def test_cuda_ties_go_to_the_lower_index(metric):
    base = torch.tensor([1.0] * 8 + [-1.0] * 8)
    ref = -base.repeat(37, 1)
    tied_at = [19, 4, 11, 30, 7, 23, 15]
    for i, row in enumerate(tied_at):
        ref[row] = base
        ref[row, i], ref[row, 8 + (3 * i) % 8] = -1, 1
    _, index = biasfast.knn(base.repeat(3, 1).cuda(), ref.cuda(), k=5, metric=metric)
    assert index.cpu().tolist() == [sorted(tied_at)[:5]] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["cosine", "pearson"])
def test_cuda_normalises_rows_in_float64_like_the_cpu(metric):
    # Rows near 1e20 square past float32's range (1e40): normalised in float32 the CUDA kernel would divide by an
    # infinite norm and see zero rows; normalised in float64 and rounded once it answers as the CPU op does.
    g = torch.Generator().manual_seed(4)
    query, ref = 1e20 * torch.randn(19, 33, generator=g), 1e20 * torch.randn(257, 33, generator=g)
    dist, index = biasfast.knn(query.cuda(), ref.cuda(), k=4, metric=metric)
    assert torch.isfinite(dist).all()
    assert_exact_knn(dist.cpu(), index.cpu(), query, ref, 4, metric)


@pytest.mark.gpu
def test_cuda_streaming_equals_in_memory_with_global_indices():
    query, ref = torch.randn(23, 17).cuda(), torch.randn(901, 17).cuda()
    whole = biasfast.knn(query, ref, k=7)
    streamed = biasfast.knn(query, [ref[:300], ref[300:650], ref[650:]], k=7)
    assert torch.equal(whole[1], streamed[1])
    torch.testing.assert_close(whole[0], streamed[0])


@pytest.mark.gpu
def test_cuda_nan_inf_and_undefined_rows_raise_the_cpu_errors():
    # The same words as the CPU kernel (test_nan_and_inf_name_the_tensor_and_first_bad_row,
    # test_bad_input_names_the_argument): the tensor, the problem and the first bad row (ref rows from index_offset).
    query, ref = torch.randn(4, 3), torch.randn(3000, 3)
    ref[2100, 1] = float("nan")
    ref[2500, 0] = float("inf")
    for device in ("cpu", "cuda"):
        q, r = query.to(device), ref.to(device)
        with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 2100\)"):
            torch.ops.biasfast.knn(q, r, 1, "l2", 0, False, 64)
        with pytest.raises(ValueError, match=r"ref.*NaN or Inf \(first bad row 3100\)"):
            torch.ops.biasfast.knn(q, r, 1, "cosine", 1000, False, 64)
        bad_query = q.clone()
        bad_query[2, 2] = float("inf")
        with pytest.raises(ValueError, match=r"query.*NaN or Inf \(first bad row 2\)"):
            torch.ops.biasfast.knn(bad_query, r[:10], 1, "pearson", 0, False, 64)
        zero = r[:10].clone()
        zero[6] = 0
        with pytest.raises(ValueError, match=r"ref.*row 1006 has zero norm: its cosine distance is undefined"):
            torch.ops.biasfast.knn(q, zero, 1, "cosine", 1000, False, 64)
        constant = r[:10].clone()
        constant[3] = 2.5
        with pytest.raises(ValueError, match=r"ref.*row 3 is constant: its pearson distance is undefined"):
            torch.ops.biasfast.knn(q, constant, 1, "pearson", 0, False, 64)
        with pytest.raises(ValueError, match=r"query.*row 0 has zero norm"):
            torch.ops.biasfast.knn(torch.zeros(2, 3, device=device), r[:10], 1, "cosine", 0, False, 64)
        torch.ops.biasfast.knn(q, zero, 1, "l2", 0, False, 64)  # zero rows are fine under l2


@pytest.mark.gpu
def test_cuda_opcheck():
    query, ref = torch.randn(5, 7).cuda(), torch.randn(11, 7).cuda()
    torch.library.opcheck(torch.ops.biasfast.knn.default, (query, ref, 3, "l2", 0, False, 16))
    torch.library.opcheck(torch.ops.biasfast.knn.default, (query.double(), ref, 2, "pearson", 5, False, 16))
    torch.library.opcheck(torch.ops.biasfast.knn.default, (ref, ref, 2, "cosine", 0, True, 16))
    torch.library.opcheck(torch.ops.biasfast.knn.default, (query.half(), ref.half(), 2, "sqeuclidean", 0, False, 16))
