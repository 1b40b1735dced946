"""Property-based fuzz of the public API: dtypes, shapes (empty, 1-D, large leading dims), NaN/Inf,
non-contiguous and overlapping (stride-0) memory. Every call returns the reference's answer in the right shape
or raises ValueError/TypeError whose message names the offending argument; never another exception."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import biasfast
from biasfast._core.constants import METRICS, PREDICTIONS, REDUCTIONS
from biasfast.diffusion import sampling
from biasfast.diffusion.weighting import WEIGHTINGS
from biasfast.ops import reference

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
        # named as "name: ...", "argument 'name': ..." or "a, name: ...": a bare substring would let "t" match
        named = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?=[:',])", message)]
        assert named, f"{type(exc).__name__} names no argument: {message}"
        return False, None


@st.composite
def tensors(draw, shape, dtypes=None):
    """A tensor of `shape` in a drawn dtype (mostly floating) and memory layout, sometimes with a NaN or Inf."""
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
        if value.numel() and draw(st.integers(0, 7)) == 0:
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
    nq, nr, d = (data.draw(mostly(valid, bad)) for valid, bad in (([1, 4, 9], [0]), ([2, 6, 11], [0, 1]),
                                                                  ([1, 3, 5], [0])))
    one_d = data.draw(st.integers(0, 5)) == 0
    metric = data.draw(mostly(list(METRICS), ["manhattan"]))
    token = [torch.int64, torch.int32, torch.uint8, torch.bool]
    dtypes = (token if metric == "hamming" else FLOATS) if data.draw(st.integers(0, 4)) else DTYPES
    query = data.draw(tensors((d,) if one_d else (nq, d), dtypes))
    ref = data.draw(tensors((nr, d), dtypes))
    k = data.draw(mostly([1, 2, 5], [-1, 0, 13]))
    ok, result = rejected_clearly(lambda: biasfast.knn(query, ref, k=k, metric=metric),
                                  ("query", "ref", "k", "metric"))
    if not ok:
        return
    dist, index = result
    rows = 1 if one_d else nq
    assert dist.shape == index.shape and dist.shape[0] == rows and index.dtype == torch.int64
    assert k >= 1 and _finite(query) and _finite(ref), "accepted a bad k, NaN or Inf"
    q = query.reshape(rows, -1)
    expected = reference.knn(q if metric == "hamming" else q.double(), ref if metric == "hamming" else ref.double(),
                             k, metric)[0]
    found = min(k, nr)
    assert dist.shape[1] in (found, k)
    torch.testing.assert_close(dist[:, :found].double(), expected[:, :found].double(), rtol=2e-2, atol=2e-2)
    assert torch.isinf(dist[:, found:]).all() and (index[:, found:] == -1).all()


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
