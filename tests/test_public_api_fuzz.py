"""Property-based fuzz of the public API: dtypes, shapes (empty, 1-D, large leading dims), NaN/Inf,
non-contiguous and overlapping (stride-0) memory. Every call returns the reference's answer in the right shape
or raises ValueError/TypeError whose message names the offending argument; never another exception."""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import biasfast
from biasfast._core.constants import METRICS, PREDICTIONS, REDUCTIONS
from biasfast.diffusion import sampling
from biasfast.diffusion.weighting import WEIGHTINGS
from biasfast.ops import reference
from tests.metrics.test_bias_score import distance_matrix

# Small tensors, hundreds of tiny rows: one intra-op thread (OpenMP barriers would dominate on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


def mostly(valid: list, bad: list):
    """A strategy that draws one of `valid` seven times as often as one of `bad`, so that most calls get past
    the checks and are compared with the reference, and every bad value is still tried."""
    return st.sampled_from(list(valid) * (7 * max(1, len(bad))) + list(bad))


FLOATS, OTHERS = DTYPES[:4], DTYPES[4:]


def rejected_clearly(call, names: tuple[str, ...]):
    """call() → (True, result); or (False, None) when it raised ValueError/TypeError naming one of `names`."""
    try:
        result = call()
        event("accepted")  # --hypothesis-show-statistics: how many calls got past the checks
        return True, result
    except (ValueError, TypeError) as exc:
        message = str(exc)
        event(f"rejected: {type(exc).__name__}: {message[:60]}")
        # named as "name: ...", "argument 'name': ...", "a, name: ..." or "name (chunk 2): ..." (a streamed
        # chunk of it): a bare substring would let "t" match
        named = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?=[:',]| \(chunk \d+\):)", message)]
        assert named, f"{type(exc).__name__} names no argument: {message}"
        return False, None


@st.composite
def tensors(draw, shape, dtypes=None, nonfinite_odds: int = 8):
    """A tensor of `shape` in a drawn dtype (mostly floating) and memory layout, with a NaN or Inf once in
    `nonfinite_odds` floating tensors."""
    dtype = draw(st.sampled_from(dtypes) if dtypes else mostly(FLOATS, OTHERS))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["contiguous", "strided", "overlapping"]))
    if layout == "strided" and len(shape) >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=g)[..., ::2][..., : shape[-1]]
    elif layout == "overlapping" and len(shape) >= 1 and shape[0] > 0:
        base = torch.randn(1, *shape[1:], generator=g).expand(*shape)  # every row the same memory
    else:
        base = torch.randn(*shape, generator=g)
    if dtype.is_floating_point:
        value = base.to(dtype)
        if value.numel() and draw(st.integers(0, nonfinite_odds - 1)) == 0:
            value = value.clone()
            value.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(st.sampled_from(
                [math.nan, math.inf, -math.inf]))
        return value
    return (base * 3).round().clamp(min=0 if dtype in (torch.uint8, torch.bool) else -5).to(dtype)


def _scale(x: torch.Tensor) -> float:
    """1 + the largest finite magnitude in x: absolute tolerances grow with the values compared."""
    finite = x[torch.isfinite(x)]
    return 1 + (finite.abs().max().item() if finite.numel() else 0)


def _finite(x: torch.Tensor) -> bool:
    return not x.is_floating_point() or bool(torch.isfinite(x).all())


def assert_close_where_finite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN/Inf inputs that a hot-loop op lets through (a check would sync the host) must come out non-finite
    exactly where the float64 reference's do, never as finite wrong numbers; the rest within low-precision
    tolerance."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    torch.testing.assert_close(actual.double()[finite], expected[finite], rtol=2e-2, atol=2e-2 * _scale(expected))


# ---- knn ----

@FUZZ
@given(st.data())
def test_knn(data):
    nq, nr = (data.draw(mostly(valid, bad)) for valid, bad in (([1, 4, 9, 300], [0]), ([2, 6, 11, 300], [0, 1])))
    # knn's contract: rows of any shape (rows, ...), flattened per row in memory order; ref's rows may be shaped
    # otherwise (images against flat rows), not another size
    query_features = data.draw(mostly([(1,), (3,), (5,), (2, 3), (3, 1, 2)], [(0,)]))
    d = math.prod(query_features)
    ref_features = data.draw(mostly([query_features, (d,), (d, 1)], [(d + 1,)]))
    one_d = data.draw(st.integers(0, 5)) == 0
    metric = data.draw(mostly(list(METRICS), ["manhattan"]))
    token = [torch.int64, torch.int32, torch.uint8, torch.bool]
    dtypes = (token if metric == "hamming" else FLOATS) if data.draw(st.integers(0, 4)) else DTYPES
    query = data.draw(tensors((d,) if one_d else (nq, *query_features), dtypes))
    ref = data.draw(tensors((nr, *ref_features), dtypes))
    k = data.draw(mostly([1, 2, 5], [-1, 0, 13]))
    ok, result = rejected_clearly(lambda: biasfast.knn(query, ref, k=k, metric=metric),
                                  ("query", "ref", "k", "metric"))
    if not ok:
        return
    dist, index = result
    rows = 1 if one_d else nq
    assert dist.shape == index.shape and dist.shape[0] == rows and index.dtype == torch.int64
    assert k >= 1 and _finite(query) and _finite(ref), "accepted a bad k, NaN or Inf"
    assert math.prod(ref.shape[1:]) == math.prod(query.shape[1:]), "accepted rows of another size"
    q, r = query.reshape(rows, -1), ref.reshape(nr, -1)
    expected = reference.knn(q if metric == "hamming" else q.double(), r if metric == "hamming" else r.double(),
                             k, metric)[0]
    found = min(k, nr)
    assert dist.shape[1] in (found, k)
    torch.testing.assert_close(dist[:, :found].double(), expected[:, :found].double(), rtol=2e-2, atol=2e-2)
    assert torch.isinf(dist[:, found:]).all() and (index[:, found:] == -1).all()


# ---- bias_score ----
# The float64 brute force of metrics/bias.py's definitions on the inputs as given: own/cross nearest distances under
# the metric, the sign statistics with ties left out, paired distances, the gap ratio on Euclidean (Hamming for
# tokens) distances, the NN-distance histogram KL; and which arguments a call must be refused for.

def _rows64(x: torch.Tensor) -> torch.Tensor:
    """(rows, features) in float64 (int64 for tokens, whose comparisons must not round)."""
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return rows.double() if rows.is_floating_point() else rows.long()


def _query_dtype(parts: list[torch.Tensor], metric: str) -> torch.dtype:
    """The dtype bias_score searches in: the samples' and test's promoted dtype (integer images as float32)."""
    dtype = None
    for part in parts:
        part_dtype = part.dtype if metric == "hamming" or part.is_floating_point() else torch.float32
        dtype = part_dtype if dtype is None else torch.promote_types(dtype, part_dtype)
    return dtype


def _fits(tokens: torch.Tensor, dtype: torch.dtype) -> bool:
    """Every token value survives the cast to the samples' token dtype."""
    return tokens.numel() == 0 or torch.equal(tokens.to(dtype).long(), tokens.long())


def _bias_problems(inputs: dict, metric: str) -> set[str]:
    """The arguments a call with these inputs must be refused for, all of them (the call names the first it
    checks); empty: it must succeed.

    bias_score searches the training rows in the samples' dtype (`_query_dtype`): a float32 training row is read
    as float16 beside float16 samples, so whether it is constant, all zero, finite or shared with the other set is
    decided there (two float32 rows that round to one float16 row are the same row)."""
    if metric not in METRICS:
        return {"metric"}
    given = {name: value for name, value in inputs.items() if value is not None}
    problems = {name for name, value in given.items()
                if value.dim() < 2 or (metric == "hamming" and value.is_floating_point())}
    if given["samples_a"].dim() < 2:
        return problems
    queries = [given[k] for k in ("samples_a", "samples_b", "test") if k in given]
    searched = _query_dtype(queries, metric)
    rows = {name: _rows64(value if metric == "hamming" or not name.startswith("train") else value.to(searched))
            for name, value in given.items() if value.dim() >= 2}
    n, features = rows["samples_a"].shape
    if n == 0 or features == 0:
        problems.add("samples_a")
    if "samples_b" in rows and rows["samples_b"].shape != (n, features):
        problems.add("samples_b")
    if "test" in rows and (rows["test"].shape[0] == 0 or rows["test"].shape[1] != features):
        problems.add("test")
    for name in ("train_a", "train_b"):
        if name in rows and (rows[name].shape[0] < 2 or rows[name].shape[1] != features):
            problems.add(name)
    for name, value in rows.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            problems.add(name)
        elif metric == "pearson" and value.numel() and (value == value[:, :1]).all(dim=1).any():
            problems.add(name)  # a constant row: no correlation
        elif metric == "cosine" and value.numel() and (value == 0).all(dim=1).any():
            problems.add(name)  # an all-zero row: no angle
    if metric == "hamming" and not any(q.is_floating_point() for q in queries):
        problems |= {name for name in ("train_a", "train_b")
                     if name in rows and not rows[name].is_floating_point() and not _fits(rows[name], searched)}
    if problems:
        return problems
    set_a, set_b = ({tuple(row) for row in rows[name].tolist()} for name in ("train_a", "train_b"))
    if set_a <= set_b or set_b <= set_a:
        problems |= {"train_a", "train_b"}  # one set inside the other: the score would measure nothing
    return problems


def _two_sided_binomial_p(wins: int, trials: int) -> float:
    """Exact, in integers: the outcomes no more likely than `wins` under p = 1/2 are the two tails beyond it."""
    low = min(wins, trials - wins)
    if 2 * low == trials:
        return 1.0
    return float(Fraction(2 * sum(math.comb(trials, i) for i in range(low + 1)), 2**trials))


def _wilson(wins: int, trials: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = wins / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def _tolerance(rows: dict[str, torch.Tensor], dtype: torch.dtype, metric: str) -> tuple[float, float]:
    """Bounds on |reported − exact| for the metric's distances and for squared Euclidean ones (the gap ratio's):
    the search reads the training rows in the samples' dtype, with float32 arithmetic unless that is float64."""
    if metric == "hamming":
        return 0.0, 0.0
    eps = torch.finfo(dtype).eps if dtype == torch.float64 else max(torch.finfo(dtype).eps, 2.0**-23)
    values = torch.cat([r.double() for r in rows.values()])
    norm = float(values.norm(dim=1).max())
    features = values.shape[1]
    squared = 64 * eps * (1 + 2 * norm) ** 2
    if metric == "l2":
        return 64 * eps * (1 + norm), squared
    if metric == "sqeuclidean":
        return squared, squared
    centred = values - values.mean(1, keepdim=True) if metric == "pearson" else values
    spread = float((values.norm(dim=1) / centred.norm(dim=1)).max())  # pearson: rounding is relative to the spread
    return 64 * eps * spread * (1 + math.sqrt(features)), squared


def _histogram_kl(p_values: torch.Tensor, q_values: torch.Tensor, upper: float) -> float:
    edges = np.linspace(0.0, upper, 21)
    p = np.clip(np.histogram(p_values.numpy(), edges)[0] / p_values.numel(), 1e-8, 1)
    q = np.clip(np.histogram(q_values.numpy(), edges)[0] / q_values.numel(), 1e-8, 1)
    return float((p * np.log(p / q)).sum())


def _check_report(report, inputs: dict, metric: str) -> None:
    rows = {name: _rows64(value) for name, value in inputs.items() if value is not None}
    a, b, train_a, train_b = (rows[k] for k in ("samples_a", "samples_b", "train_a", "train_b"))
    n = a.shape[0]
    dtype = _query_dtype([inputs[k] for k in ("samples_a", "samples_b", "test") if inputs[k] is not None], metric)
    tol, tol_squared = _tolerance(rows, dtype, metric)
    assert report.metric == metric and report.n_samples == n
    assert report.own_nn.shape == report.cross_nn.shape == (2, n) and report.own_nn.dtype == torch.float64
    d_aa, d_ab, d_bb, d_ba = (distance_matrix(x, y, metric) for x, y in ((a, train_a), (a, train_b), (b, train_b),
                                                                     (b, train_a)))
    own = torch.stack([d_aa.min(1).values, d_bb.min(1).values])
    cross = torch.stack([d_ab.min(1).values, d_ba.min(1).values])
    off = max(float((report.own_nn - own).abs().max()), float((report.cross_nn - cross).abs().max()))
    assert off <= tol, f"nearest distances off by {off:.3g} (tolerance {tol:.3g})"

    # the sign statistics: where own and cross differ by more than the rounding allows, the report must agree with
    # the exact comparison; ties within rounding may go any way (the report then counts its own verdict)
    exact = torch.sign(cross - own)
    reported = torch.sign(report.cross_nn - report.own_nn)
    decided = (cross - own).abs() > 2 * tol if tol else torch.ones_like(own, dtype=torch.bool)
    event(f"bias_score: {'some' if not decided.all() else 'no'} own/cross within rounding")
    assert torch.equal(reported[decided], exact[decided]), "a sample's d_own < d_cross verdict differs"
    wins, losses = int((reported > 0).sum()), int((reported < 0).sum())
    trials = wins + losses
    assert report.n_ties == 2 * n - trials
    if trials == 0:
        assert math.isnan(report.score) and report.score_undefined and report.p_value == 1.0
        assert report.score_ci == (-1.0, 1.0)
    else:
        assert report.score_undefined is None
        assert report.score == pytest.approx(2 * wins / trials - 1, abs=1e-12)
        low, high = _wilson(wins, trials)
        assert report.score_ci == pytest.approx((2 * low - 1, 2 * high - 1), abs=1e-12)
        assert report.p_value == pytest.approx(_two_sided_binomial_p(wins, trials), rel=1e-9, abs=1e-300)

    # paired distances: computed exactly from the samples as given
    pairs = distance_matrix(a, b, metric).diagonal()
    expected_pairs = (float(pairs.mean()), float(np.median(pairs.numpy())),
                      float(pairs.std() / math.sqrt(n)) if n > 1 else math.nan)
    assert tuple(report.pair_distance) == pytest.approx(expected_pairs, rel=1e-9, abs=1e-12, nan_ok=True)

    # proximity gap = 1 − mean(own) / mean(cross): bounded by the means' rounding (each within tol)
    mean_own, mean_cross = float(own.mean()), float(cross.mean())
    if metric == "hamming" and mean_cross == 0:
        assert math.isnan(report.proximity_gap)
    elif mean_cross > 2 * tol:
        low, high = 1 - (mean_own + tol) / (mean_cross - tol), 1 - max(0.0, mean_own - tol) / (mean_cross + tol)
        slack = 1e-9 * max(1.0, abs(low), abs(high))
        assert low - slack <= report.proximity_gap <= high + slack, (report.proximity_gap, low, high)

    # memorized: d1/d2 < 1/3 in the own set on Euclidean (Hamming) distances; d1 = d2 = 0 counts
    euclid = "hamming" if metric == "hamming" else "sqeuclidean"
    two = torch.cat([distance_matrix(a, train_a, euclid).sort(1).values[:, :2],
                     distance_matrix(b, train_b, euclid).sort(1).values[:, :2]])
    d1, d2 = two[:, 0], two[:, 1]
    below = d1 < d2 / 3 if metric == "hamming" else d1 < d2 / 9  # squared: d1/d2 < 1/3 ⇔ d1² < d2²/9
    memorized = torch.where(d2 > 0, below, d1 == 0)
    unsure = ((d1 - d2 / (3 if metric == "hamming" else 9)).abs() <= 2 * tol_squared) | (d2 <= 2 * tol_squared)
    if metric == "hamming":
        unsure[:] = False
    count = round(report.memorized_fraction * 2 * n)
    assert report.memorized_fraction == pytest.approx(count / (2 * n), abs=1e-9)
    assert int(memorized[~unsure].sum()) <= count <= int(memorized[~unsure].sum()) + int(unsure.sum())

    if "test" not in rows:
        assert report.nn_divergence is None
        return
    test = rows["test"]
    fresh = torch.cat([distance_matrix(test, train_a, metric).min(1).values,
                       distance_matrix(test, train_b, metric).min(1).values])
    generated = own.flatten()
    largest = float(a.shape[1]) if metric == "hamming" else max(float(generated.max()), float(fresh.max()))
    upper = largest if largest > 0 else 1.0
    edges = torch.linspace(0, upper, 21, dtype=torch.float64)[1:-1]
    values = torch.cat([generated, fresh])
    # a distance within rounding of a bin edge may land in either bin; the edges move with the largest distance,
    # and all of them when that is within rounding of 0 (the bins then span 0 … rounding noise, or 0 … 1 at 0)
    near_edge = tol > 0 and (largest <= 4 * tol or bool(((values[:, None] - edges[None, :]).abs() <= 4 * tol).any()))
    assert report.nn_divergence is not None and math.isfinite(report.nn_divergence)
    if near_edge:
        event("bias_score: nn_divergence not compared (a distance within rounding of a bin edge)")
    else:
        assert report.nn_divergence == pytest.approx(_histogram_kl(generated, fresh, upper), rel=1e-9, abs=1e-12)


@st.composite
def _bias_inputs(draw):
    """samples_a, samples_b, train_a, train_b, test (or None) and the metric: mostly valid, every kind of bad."""
    metric = draw(mostly(["default", "default", *METRICS], ["manhattan"]))
    hamming = metric == "hamming"
    token = [torch.int64, torch.int32, torch.uint8, torch.bool]
    dtypes = (token if hamming else FLOATS) if draw(st.integers(0, 4)) else DTYPES
    # fewer samples than training rows, hundreds of them with tiny rows, images (C, H, W); no samples, 1-D inputs,
    # empty rows: each bad value about once in 13 calls
    n = draw(st.sampled_from([1, 4, 9, 300] * 3 + [0]))
    features = draw(st.sampled_from([(6,), (2, 3, 2), (1, 4, 1), (2,), (3,)] * 3 + [(), (0,)]))
    size = math.prod(features)

    def shape(rows: int) -> tuple[int, ...]:
        """Another argument's shape: the samples' features, the same size flattened, or another size."""
        how = draw(mostly(["same", "same", "flat"], ["other"]))
        if not features:
            return (rows,)
        return (rows, *features) if how == "same" else (rows, size) if how == "flat" else (rows, size + 1)

    def tensor(shape: tuple[int, ...]) -> torch.Tensor:
        return draw(tensors(shape, dtypes, nonfinite_odds=24))

    samples_a = tensor((n, *features))
    samples_b = tensor(shape(draw(st.sampled_from([n] * 15 + [n + 1]))))
    train_a, train_b = (tensor(shape(draw(mostly([2, 7, 250], [0, 1])))) for _ in range(2))
    test = tensor(shape(draw(mostly([3, 200], [0])))) if draw(st.booleans()) else None
    inputs = dict(samples_a=samples_a, samples_b=samples_b, train_a=train_a, train_b=train_b, test=test)
    return inputs, metric


def _streamed(train: torch.Tensor, how: str):
    """A training set as given, as a numpy array, or as chunks (an empty one first)."""
    if how == "numpy" and train.dtype != torch.bfloat16:
        return train.numpy()
    if how == "chunks" and train.dim() >= 2:
        return [train[:0], *train.split(max(1, (len(train) + 2) // 3))]
    return train


@settings(FUZZ, max_examples=500)
@given(_bias_inputs(), st.sampled_from(["tensor", "tensor", "numpy", "chunks"]))
def test_bias_score(drawn, how):
    """Inputs it must refuse are refused naming one of the arguments at fault; every other call's report equals
    the brute force within the rounding of the searched dtype (exactly for tokens), training sets given as
    tensors, numpy arrays or chunks."""
    inputs, metric = drawn
    options = {} if metric == "default" else {"metric": metric}
    metric = "pearson" if metric == "default" else metric
    problems = _bias_problems(inputs, metric)
    given_a, given_b = (_streamed(inputs[name], how) for name in ("train_a", "train_b"))

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # shared training rows, all ties: reported, not raised
            return biasfast.bias_score(inputs["samples_a"], inputs["samples_b"], given_a, given_b,
                                       test=inputs["test"], **options)

    if not problems:
        _check_report(call(), inputs, metric)
        event("accepted")
        return
    ok, _ = rejected_clearly(call, tuple(problems))
    assert not ok, f"accepted inputs it must refuse ({', '.join(sorted(problems))})"


# ---- snr_weighted_loss ----

@FUZZ
@given(st.data())
def test_snr_weighted_loss(data):
    shape = data.draw(mostly([(1, 3), (5, 2), (3, 2, 2), (1 << 16, 1)], [(0, 3), (1,), (5,), (4, 0)]))
    pred = data.draw(tensors(shape))
    same = [pred.dtype] if pred.is_floating_point() else FLOATS
    target = data.draw(tensors(data.draw(mostly([shape], [shape[:1] + (7,)])), data.draw(mostly([same], [FLOATS]))))
    steps = data.draw(mostly([10], [0]))
    batch = data.draw(mostly([shape[0]], [shape[0] + 1]))
    timesteps = torch.randint(0, data.draw(mostly([10], [11])), (batch,)) - data.draw(mostly([0], [1]))
    timesteps = timesteps.to(data.draw(mostly([torch.int64, torch.int32], [torch.float32])))
    weights = data.draw(tensors((steps,), FLOATS))
    weights = weights.abs() if data.draw(mostly([True], [False])) else weights  # weights must be >= 0
    reduction = data.draw(mostly(list(REDUCTIONS), ["max"]))
    ok, loss = rejected_clearly(lambda: biasfast.snr_weighted_loss(pred, target, timesteps, weights, reduction),
                                ("pred", "target", "timesteps", "weights", "reduction"))
    if not ok:
        return
    assert pred.shape == target.shape and timesteps.shape == (shape[0],) and (timesteps >= 0).all()
    assert _finite(weights), "accepted NaN or Inf weights"
    rows = (shape[0], -1)  # 1-D pred: one value per sample (the reference wants (batch, ...) with a feature dim)
    expected = reference.snr_loss(pred.double().reshape(rows), target.double().reshape(rows), timesteps.long(),
                                  weights.double(), reduction)
    assert loss.shape == expected.shape
    assert_close_where_finite(loss, expected)


# ---- sampling.step ----

@FUZZ
@given(st.data())
def test_sampling_step(data):
    schedule = biasfast.NoiseSchedule("linear", 50)
    shape = data.draw(mostly([(1, 3), (3, 4), (2, 1, 3, 3), (1 << 15, 2)], [(0, 2), (1,)]))
    x_t = data.draw(tensors(shape, data.draw(mostly([FLOATS], [[torch.int64]]))))
    same = [x_t.dtype] if x_t.is_floating_point() else FLOATS
    output = data.draw(tensors(data.draw(mostly([shape], [(shape[0] + 1, *shape[1:]), (shape[0], 5)])),
                               data.draw(mostly([same], [FLOATS]))))
    t = data.draw(mostly([1, 30, 49], [0, 50, -2]))
    t_prev = data.draw(mostly([-1, 0], [49, 60]))
    method = data.draw(mostly(["ddim", "ddpm"], ["euler"]))
    prediction = data.draw(mostly(list(PREDICTIONS), ["score"]))
    options = dict(method=method, prediction=prediction)
    if method == "ddpm":
        options["noise"] = torch.zeros(shape, dtype=x_t.dtype if x_t.is_floating_point() else torch.float32)
    ok, x_prev = rejected_clearly(lambda: sampling.step(x_t, output, t, t_prev, schedule, **options),
                                  ("x_t", "model_output", "t", "t_prev", "method", "prediction", "noise"))
    if not ok:
        return
    assert x_prev.shape == x_t.shape and output.shape == x_t.shape and 0 <= t < 50 and -1 <= t_prev < t
    # NaN/Inf in x_t or the model output may pass (see assert_close_where_finite).
    batch = torch.full((shape[0],), t), torch.full((shape[0],), t_prev)
    expected, _ = reference.sampler_step(x_t.double(), output.double(), *batch, schedule.alphas_cumprod.double(),
                                         method=method, prediction=prediction,
                                         noise=options.get("noise", torch.zeros(())).double())
    assert_close_where_finite(x_prev, expected)


# ---- weighting and NoiseSchedule ----

@FUZZ
@given(st.sampled_from([*WEIGHTINGS, "snr_cubed"]), st.sampled_from([*PREDICTIONS, "score"]),
       st.sampled_from([None, 5.0, 0.0, -1.0, math.nan]), st.sampled_from(["linear", "cosine"]),
       st.sampled_from([1, 2, 1000]))
def test_weighting(name, prediction, max_weight, schedule_name, steps):
    ok, schedule = rejected_clearly(lambda: biasfast.NoiseSchedule(schedule_name, steps), ("num_timesteps",
                                                                                            "schedule"))
    if not ok:
        return
    ok, weights = rejected_clearly(lambda: biasfast.weighting(name, schedule, prediction, max_weight=max_weight),
                                   ("name", "prediction", "max_weight", "weighting"))
    if not ok:
        return
    assert weights.shape == (steps,) and torch.isfinite(weights).all() and (weights >= 0).all()
    assert max_weight is None or max_weight > 0
    if max_weight is not None:
        assert (weights <= max_weight * (1 + 1e-6)).all()


@FUZZ
@given(st.data())
def test_noise_schedule(data):
    kind = data.draw(st.sampled_from(["name", "table"]))
    if kind == "name":
        schedule = data.draw(st.sampled_from(["linear", "cosine", "scaled_linear", "quadratic_typo"]))
    else:
        length = data.draw(st.sampled_from([0, 1, 5]))
        table = torch.linspace(0.99, 0.01, length, dtype=data.draw(st.sampled_from([torch.float32, torch.float64])))
        change = data.draw(st.sampled_from(["none", "rising", "above_one", "zero", "nan", "2-D", "int"]))
        if length and change == "rising":
            table = table.flip(0)
        elif length and change == "above_one":
            table[0] = 1.5
        elif length and change == "zero":
            table[-1] = 0.0
        elif length and change == "nan":
            table[-1] = math.nan
        elif change == "2-D":
            table = table.view(1, -1)
        elif change == "int":
            table = (table * 100).long()
        schedule = table
    steps = data.draw(st.sampled_from([1000, 5, 1, 0, -3, True, 2.5]))
    zero_terminal = data.draw(st.booleans())
    ok, made = rejected_clearly(lambda: biasfast.NoiseSchedule(schedule, steps, zero_terminal_snr=zero_terminal),
                                ("schedule", "num_timesteps", "zero_terminal_snr", "alphas_cumprod"))
    if not ok:
        return
    table = made.alphas_cumprod
    assert table.dim() == 1 and len(table) >= 1 and torch.isfinite(table).all()
    assert (table <= 1).all() and (table >= 0).all() and (table[1:] <= table[:-1]).all()
    if kind == "name":
        assert isinstance(steps, int) and not isinstance(steps, bool) and len(table) == steps
