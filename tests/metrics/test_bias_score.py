"""biasfast.bias_score against a float64 brute force; memorizer and generalizer regimes; statistics; BiasTracker."""

import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

import biasfast
from biasfast.metrics import stats
from biasfast.metrics import BiasReport, BiasTracker, PairDistance
from tests.conftest import devices

METRICS = ["l2", "sqeuclidean", "cosine", "pearson", "hamming"]


# ---- float64 brute force: full distance matrices, nothing shared with the implementation ----------------


def distance_matrix(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """The full (len(x), len(y)) distance matrix in float64 (the fuzz of the public API uses it too)."""
    if metric == "hamming":
        return (x[:, None, :] != y[None, :, :]).sum(-1).double()
    x, y = x.double(), y.double()
    if metric in ("l2", "sqeuclidean"):
        squared = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return squared.sqrt() if metric == "l2" else squared
    if metric == "pearson":
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return (1 - (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).T).clamp_min(0)


def _exact_binomial_p(wins: int, trials: int) -> float:
    """Two-sided exact test by enumeration with exact rationals: outcomes no more likely than the observed."""
    pmf = [Fraction(math.comb(trials, i), 2**trials) for i in range(trials + 1)]
    return float(min(Fraction(1), sum(p for p in pmf if p <= pmf[wins])))


def brute_force(samples_a, samples_b, train_a, train_b, metric, test=None, bins=20):
    a, b = samples_a.flatten(1), samples_b.flatten(1)
    ta, tb = train_a.flatten(1), train_b.flatten(1)
    n = a.shape[0]
    d_aa, d_ab = distance_matrix(a, ta, metric), distance_matrix(a, tb, metric)
    d_bb, d_ba = distance_matrix(b, tb, metric), distance_matrix(b, ta, metric)
    own = torch.stack([d_aa.min(1).values, d_bb.min(1).values])
    cross = torch.stack([d_ab.min(1).values, d_ba.min(1).values])
    wins, losses = int((own < cross).sum()), int((own > cross).sum())
    trials = wins + losses
    p = wins / trials
    z = 1.959963984540054
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    pairs = distance_matrix(a, b, metric).diagonal()
    gap_metric = "hamming" if metric == "hamming" else "l2"
    gaps = torch.cat([distance_matrix(a, ta, gap_metric).sort(1).values[:, :2],
                      distance_matrix(b, tb, gap_metric).sort(1).values[:, :2]])
    ratio = gaps[:, 0] / gaps[:, 1]
    memorized = torch.where(gaps[:, 1] == 0, torch.ones_like(ratio), (ratio < 1 / 3).double())
    divergence = None
    if test is not None:
        t = test.flatten(1)
        fresh = torch.cat([distance_matrix(t, ta, metric).min(1).values, distance_matrix(t, tb, metric).min(1).values])
        generated = own.flatten()
        upper = float(a.shape[1]) if metric == "hamming" else max(float(generated.max()), float(fresh.max()))
        edges = np.linspace(0, upper, bins + 1)
        hp = np.clip(np.histogram(generated.numpy(), edges)[0] / generated.numel(), 1e-8, 1)
        hq = np.clip(np.histogram(fresh.numpy(), edges)[0] / fresh.numel(), 1e-8, 1)
        divergence = float((hp * np.log(hp / hq)).sum())
    return {
        "score": (wins - losses) / trials,
        "score_ci": (2 * max(0.0, centre - half) - 1, 2 * min(1.0, centre + half) - 1),
        "p_value": _exact_binomial_p(wins, trials),
        "pair_distance": (float(pairs.mean()), float(pairs.median()) if n % 2 else float(pairs.sort().values[n // 2 - 1 : n // 2 + 1].mean()),
                          float(pairs.std() / math.sqrt(n))),
        "own_nn": own,
        "cross_nn": cross,
        "proximity_gap": float((cross - own).mean() / cross.mean()),
        "memorized_fraction": float(memorized.mean()),
        "nn_divergence": divergence,
        "n_ties": own.numel() - trials,
    }


def _assert_report_matches(report: BiasReport, expected: dict, metric: str, n: int):
    rel = 2e-5 if metric != "hamming" else 0.0
    assert report.metric == metric and report.n_samples == n
    assert report.n_ties == expected["n_ties"]
    assert report.score == pytest.approx(expected["score"], abs=1e-12)
    assert report.score_ci == pytest.approx(expected["score_ci"], abs=1e-12)
    assert report.p_value == pytest.approx(expected["p_value"], rel=1e-9, abs=1e-300)
    assert report.own_nn.shape == (2, n) and report.cross_nn.shape == (2, n)
    torch.testing.assert_close(report.own_nn.double().cpu(), expected["own_nn"], rtol=rel, atol=1e-6)
    torch.testing.assert_close(report.cross_nn.double().cpu(), expected["cross_nn"], rtol=rel, atol=1e-6)
    assert tuple(report.pair_distance) == pytest.approx(expected["pair_distance"], rel=1e-9, abs=1e-12)
    assert report.proximity_gap == pytest.approx(expected["proximity_gap"], rel=1e-4, abs=1e-6)
    assert report.memorized_fraction == pytest.approx(expected["memorized_fraction"], abs=1e-12)
    if expected["nn_divergence"] is None:
        assert report.nn_divergence is None
    else:
        assert report.nn_divergence == pytest.approx(expected["nn_divergence"], rel=1e-4, abs=1e-6)


def _assert_same_report(actual: dict, expected: dict):
    """Two to_dict() reports equal up to float32 rounding of the distances (chunking changes summation order)."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key in ("own_nn", "cross_nn"):
            torch.testing.assert_close(torch.tensor(actual[key]), torch.tensor(value), rtol=2e-5, atol=1e-6)
        elif isinstance(value, (str, int)) or value is None:
            assert actual[key] == value, key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _random_problem(metric: str, n: int, n_train: int, shape, n_test: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if metric == "hamming":
        make = lambda rows: torch.randint(0, 3, (rows, *shape), generator=g)  # noqa: E731
    else:
        make = lambda rows: torch.randn(rows, *shape, generator=g)  # noqa: E731
    train_a, train_b = make(n_train), make(n_train + 6)
    samples_a, samples_b = make(n), make(n)
    samples_a[:3] = train_a[:3]  # exact copies: d_own = 0
    samples_b[4] = train_b[9]
    test = make(n_test) if n_test else None
    return samples_a, samples_b, train_a, train_b, test


# ---- every field against the brute force ---------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", METRICS)
def test_every_field_matches_brute_force(metric, device):
    shape = (12,) if metric == "hamming" else (3, 4, 5)
    samples_a, samples_b, train_a, train_b, test = _random_problem(metric, 37, 53, shape, n_test=29, seed=1)
    expected = brute_force(samples_a, samples_b, train_a, train_b, metric, test)
    on = lambda t: t.to(device)  # noqa: E731
    report = biasfast.bias_score(on(samples_a), on(samples_b), on(train_a), on(train_b), metric=metric, test=on(test))
    _assert_report_matches(report, expected, metric, 37)


@pytest.mark.parametrize("metric", ["pearson", "l2", "hamming"])
def test_streamed_chunks_and_numpy_inputs_give_the_same_report(metric):
    samples_a, samples_b, train_a, train_b, test = _random_problem(metric, 25, 61, (16,), n_test=11, seed=2)
    whole = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric=metric, test=test)
    chunks_a = [train_a[i : i + 7].numpy() for i in range(0, 61, 7)]  # a list of arrays, last chunk short
    chunks_b = (train_b[i : i + 1] for i in range(train_b.shape[0]))  # one-shot generator of single rows
    streamed = biasfast.bias_score(samples_a.numpy(), samples_b.numpy(), chunks_a, chunks_b, metric=metric,
                                   test=test.numpy())
    _assert_same_report(streamed.to_dict(), whole.to_dict())


@pytest.mark.parametrize("metric", ["pearson", "hamming"])
def test_query_blocks_give_the_same_report(metric, monkeypatch):
    import biasfast.metrics.search as search

    problem = _random_problem(metric, 25, 61, (16,), n_test=11, seed=5)
    whole = biasfast.bias_score(*problem[:4], metric=metric, test=problem[4])
    monkeypatch.setattr(search, "QUERY_BLOCK_BYTES", 7 * 16 * 4)  # blocks of 7 (float) or 3–7 (token) queries
    blocked = biasfast.bias_score(*problem[:4], metric=metric, test=problem[4])
    _assert_same_report(blocked.to_dict(), whole.to_dict())


def test_ties_are_left_out_of_the_score():
    samples_a, samples_b, train_a, train_b, _ = _random_problem("l2", 31, 40, (6,), seed=3)
    train_b[5] = train_a[0]  # shared row: a sample copying it is as near A as B
    samples_a[0] = train_a[0]
    samples_b[1] = train_a[0]
    with pytest.warns(UserWarning, match="train_a and train_b share 1 identical row"):
        report = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric="l2")
    expected = brute_force(samples_a, samples_b, train_a, train_b, "l2")
    # Ties: the two copies of the shared row, and samples_a[11], whose nearest row in both sets is the shared one.
    assert expected["n_ties"] == report.n_ties == 3
    _assert_report_matches(report, expected, "l2", 31)


# ---- the two regimes -----------------------------------------------------------------------------------


def test_memorizer_scores_near_one():
    g = torch.Generator().manual_seed(4)
    train_a, train_b = torch.randn(400, 3, 4, 4, generator=g), torch.randn(400, 3, 4, 4, generator=g)
    pick = torch.randperm(400, generator=g)[:300]
    samples_a = train_a[pick] + 1e-3 * torch.randn(300, 3, 4, 4, generator=g)
    samples_b = train_b[pick] + 1e-3 * torch.randn(300, 3, 4, 4, generator=g)
    report = biasfast.bias_score(samples_a, samples_b, train_a, train_b)
    assert report.score > 0.95 and report.score_ci[0] > 0.9
    assert report.memorized_fraction > 0.9
    assert report.p_value < 1e-100
    assert report.proximity_gap > 0.9


def test_generalizer_scores_zero_within_its_interval():
    g = torch.Generator().manual_seed(5)
    n, d = 20_000, 6
    train_a, train_b = torch.randn(1000, d, generator=g), torch.randn(1000, d, generator=g)
    samples_a, samples_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    report = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric="pearson")
    low, high = report.score_ci
    assert low < 0 < high
    assert abs(report.score) < 0.05
    assert report.p_value > 0.05
    assert report.memorized_fraction < 0.05


# ---- statistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("wins,trials", [(0, 1), (1, 1), (3, 10), (5, 10), (7, 7), (50, 101), (60, 137), (0, 40)])
def test_binomial_test_is_exact(wins, trials):
    assert stats.binomial_test_half(wins, trials) == pytest.approx(_exact_binomial_p(wins, trials), rel=1e-10)


def test_binomial_test_large_n_matches_normal_tail():
    # For n = 40,000 the exact two-sided p is close to the normal approximation with continuity correction.
    wins, trials = 20_300, 40_000
    z = (abs(wins - trials / 2) - 0.5) / math.sqrt(trials / 4)
    assert stats.binomial_test_half(wins, trials) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=2e-2)


def test_wilson_interval_known_values():
    # Wilson (1927) for 8 of 10: (0.4902, 0.9433) (Newcombe 1998, Table I).
    assert stats.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


# ---- report: JSON and summary --------------------------------------------------------------------------


def test_to_dict_is_json_ready_and_summary_is_readable():
    samples_a, samples_b, train_a, train_b, test = _random_problem("pearson", 9, 20, (5,), n_test=4, seed=6)
    report = biasfast.bias_score(samples_a, samples_b, train_a, train_b, test=test)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["score"] == report.score and len(data["own_nn"]) == 2 and len(data["own_nn"][0]) == 9
    assert "own_nn" not in report.to_dict(per_sample=False)
    text = report.summary()
    assert "bias score" in text and "memorized" in text and "NN divergence" in text and len(text.splitlines()) >= 5


# ---- bad input -----------------------------------------------------------------------------------------


def _small():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, 8, generator=g) for n in (5, 5, 10, 10)]


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda s: (s[0], s[1][:4], s[2], s[3]), ValueError, "samples_b: 4 samples, but samples_a has 5"),
        (lambda s: (s[0], s[1][:, :7], s[2], s[3]), ValueError, "samples_b: feature size 7"),
        (lambda s: (s[0], s[1], s[2][:, :6], s[3]), ValueError, r"train_a: feature size 6"),
        (lambda s: (s[0], s[1], s[2], [s[3][:5], s[3][5:, :3]]), ValueError, r"train_b \(chunk 1\): feature size 3"),
        (lambda s: (s[0], s[1], s[2], s[3][:1]), ValueError, "train_b: needs at least 2 training rows"),
        (lambda s: (s[0], s[1], s[2], []), ValueError, r"train_b: needs at least 2 training rows .*, got 0"),
        (lambda s: (s[0][:0], s[1][:0], s[2], s[3]), ValueError, "samples_a: no samples"),
        (lambda s: (s[0], s[1], 3.0, s[3]), TypeError, "train_a: expected a tensor, an array or an iterable"),
        (lambda s: ([[0.0] * 8] * 5, s[1], s[2], s[3]), TypeError, "samples_a: expected a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        biasfast.bias_score(*change(_small()))


def test_nan_names_the_argument_and_row():
    samples_a, samples_b, train_a, train_b = _small()
    samples_b[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"samples_b: contains NaN or Inf \(first bad row 3\)"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b)
    samples_b[3, 2] = 0.0
    train_a[6, 0] = float("inf")
    with pytest.raises(ValueError, match=r"train_a: .*ref.*contains NaN or Inf \(first bad row 6\)"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b)


def test_constant_rows_are_rejected_for_pearson():
    samples_a, samples_b, train_a, train_b = _small()
    samples_a[2] = 0.5
    with pytest.raises(ValueError, match="samples_a: row 2 is constant, so its pearson distance is undefined"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b)
    samples_a[2] = torch.randn(8)
    train_b[7] = 3.0
    with pytest.raises(ValueError, match=r"train_b: .*row 7 is constant"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b)


def test_unknown_metric_and_float_tokens():
    samples_a, samples_b, train_a, train_b = _small()
    with pytest.raises(ValueError, match="metric: unknown metric 'manhattan'"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric="manhattan")
    with pytest.raises(TypeError, match="samples_a: metric 'hamming' needs integer token tensors"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric="hamming")
    with pytest.raises(ValueError, match="test: feature size 3"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_b, test=torch.randn(4, 3))


# ---- BiasTracker ---------------------------------------------------------------------------------------


def _report(pair_distance: float, score: float) -> BiasReport:
    per_sample = torch.zeros(2, 3)
    return BiasReport(score, (score - 0.1, score + 0.1), 0.5, PairDistance(pair_distance, pair_distance, 0.01),
                      per_sample, per_sample, 0.1, 0.0, None, 3, "pearson", 0)


def _tracker() -> BiasTracker:
    tracker = BiasTracker()
    # Pair distance is smallest at step 300, test loss at step 700: biased window (300, 700).
    for step, pair, loss in [(700, 0.21, 0.020), (100, 0.30, 0.050), (300, 0.12, 0.030), (500, 0.15, 0.024),
                             (900, 0.25, 0.022)]:
        tracker.update(step, _report(pair, score=pair * 2), loss)
    return tracker


def test_tracker_finds_tau_bias_tau_test_and_the_window():
    tracker = _tracker()
    assert tracker.column("step") == [100, 300, 500, 700, 900]
    assert tracker.tau_bias == 300 and tracker.tau_test == 700
    assert tracker.biased_window == (300, 700)
    late = BiasTracker()
    late.update(1, _report(0.3, 0.0), 0.01)
    late.update(2, _report(0.1, 0.0), 0.02)
    assert (late.tau_bias, late.tau_test, late.biased_window) == (2, 1, None)
    assert BiasTracker().tau_bias is None and BiasTracker().biased_window is None


def test_tracker_tau_bias_skips_the_rise_from_shared_weights():
    # Shared initial weights: the pair distance starts at ~0, rises, dips (generalization), rises again.
    tracker = BiasTracker()
    for step, pair in [(10, 0.01), (20, 0.05), (40, 0.19), (80, 0.14), (160, 0.12), (320, 0.16)]:
        tracker.update(step, _report(pair, 0.0), 1.0 / step)
    assert tracker.tau_bias == 160 and tracker.biased_window == (160, 320)
    # A fall within the standard errors (0.01 each) is noise, not the end of the rise.
    rising = BiasTracker()
    for step, pair in [(10, 0.01), (20, 0.05), (40, 0.045), (80, 0.09)]:
        rising.update(step, _report(pair, 0.0), 1.0)
    assert rising.tau_bias is None and rising.biased_window is None


def test_tracker_plot_writes_a_valid_png(tmp_path):
    from matplotlib.image import imread

    path = tmp_path / "plots" / "bias.png"
    _tracker().plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert os.listdir(path.parent) == ["bias.png"]  # no temporary file left behind


def test_tracker_json_round_trip(tmp_path):
    tracker = _tracker()
    path = tmp_path / "bias.json"
    tracker.to_json(path)
    data = json.loads(path.read_text())
    assert data["tau_bias"] == 300 and data["tau_test"] == 700 and data["biased_window"] == [300, 700]
    loaded = BiasTracker.from_json(path)
    assert loaded.records == tracker.records
    assert (loaded.tau_bias, loaded.tau_test, loaded.biased_window) == (300, 700, (300, 700))
    tracker.to_json(path)  # overwriting is atomic: only the target remains
    assert os.listdir(tmp_path) == ["bias.json"]


def test_tracker_bad_input(tmp_path):
    tracker = _tracker()
    with pytest.raises(ValueError, match="step: checkpoint 300 was already recorded"):
        tracker.update(300, _report(0.1, 0.0), 0.01)
    with pytest.raises(ValueError, match="test_loss: expected a finite number"):
        tracker.update(1000, _report(0.1, 0.0), float("nan"))
    with pytest.raises(TypeError, match="report: expected a BiasReport"):
        tracker.update(1000, {"score": 0.0}, 0.01)
    with pytest.raises(TypeError, match="step: expected an int"):
        tracker.update(2.5, _report(0.1, 0.0), 0.01)
    with pytest.raises(ValueError, match="no checkpoints recorded"):
        BiasTracker().plot(tmp_path / "empty.png")


# ---- sharded training sets over torch.distributed (2 gloo ranks) ---------------------------------------


def _sharded_report(rank: int, poison: bool) -> dict:
    import torch.distributed as dist

    samples_a, samples_b, train_a, train_b, test = _random_problem("pearson", 23, 41, (10,), n_test=9, seed=8)
    # Uneven shards with different numbers of chunks on each rank.
    shard_a = [train_a[:5], train_a[5:30]] if rank == 0 else [train_a[30:]]
    shard_b = [train_b[i : i + 4] for i in range(0, 12, 4)] if rank == 0 else train_b[12:].numpy()
    if poison and rank == 1:
        shard_b = shard_b.copy()
        shard_b[2, 1] = float("nan")
    try:
        return biasfast.bias_score(samples_a, samples_b, shard_a, shard_b, test=test, group=dist.group.WORLD).to_dict()
    except (ValueError, RuntimeError) as error:
        return {"error": type(error).__name__, "message": str(error)}


def _frames_left_in_cycles() -> list[str]:
    """Names of biasfast frames that only the cycle collector would free: a failed rank's exception kept
    alive this way holds the process group until interpreter shutdown, where gloo aborts the process."""
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted({o.f_code.co_name for o in gc.garbage
                       if type(o).__name__ == "frame" and "biasfast" in o.f_code.co_filename})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _sharded_worker(rank: int, world: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # A rendezvous file, not a TCP port: a port picked free can be taken before the ranks bind it.
    rendezvous = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = {"clean": _sharded_report(rank, poison=False), "poisoned": _sharded_report(rank, poison=True)}
        result["frames_in_cycles"] = _frames_left_in_cycles()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as stream:
            json.dump(result, stream)
    finally:
        dist.destroy_process_group()


def test_sharded_training_sets_give_the_single_process_report_and_failures_reach_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    samples_a, samples_b, train_a, train_b, test = _random_problem("pearson", 23, 41, (10,), n_test=9, seed=8)
    single = biasfast.bias_score(samples_a, samples_b, train_a, train_b, test=test).to_dict()
    assert rank0["clean"] == rank1["clean"]  # every rank returns the same report
    _assert_same_report(rank0["clean"], single)
    # NaN in rank 1's shard: rank 1 names it, rank 0 says which rank failed instead of waiting forever.
    assert rank1["poisoned"]["error"] == "ValueError"
    assert "contains NaN or Inf (first bad row 2)" in rank1["poisoned"]["message"]
    assert rank1["poisoned"]["message"].startswith("train_b")
    assert rank0["poisoned"]["error"] == "RuntimeError" and "failed on rank(s) [1]" in rank0["poisoned"]["message"]
    assert rank0["frames_in_cycles"] == rank1["frames_in_cycles"] == []


def test_training_sets_that_overlap_entirely_are_an_error():
    samples_a, samples_b, train_a, train_b, _ = _random_problem("l2", 9, 20, (5,), seed=8)
    with pytest.raises(ValueError, match=r"train_a, train_b: .*overlap entirely \(20 of train_b's 20 rows"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_a.clone(), metric="l2")
    with pytest.raises(ValueError, match=r"overlap entirely \(7 of train_b's 7 rows are rows of train_a's 20\)"):
        biasfast.bias_score(samples_a, samples_b, train_a, train_a[3:10], metric="l2")  # B inside A
    with pytest.raises(ValueError, match=r"overlap entirely \(6 of train_b's 20 rows"):
        biasfast.bias_score(samples_a, samples_b, train_a[:6], torch.cat([train_b[:14], train_a[:6]]), metric="l2")


def test_all_ties_give_a_reason_instead_of_a_bare_nan():
    samples_a, samples_b, train_a, train_b, _ = _random_problem("l2", 9, 20, (5,), seed=8)
    train_b[4] = train_a[2]  # one shared row, copied by every sample: d_own == d_cross everywhere
    samples_a[:], samples_b[:] = train_a[2], train_a[2]
    with pytest.warns(UserWarning, match="all ties"):
        report = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric="l2")
    assert report.n_ties == 18 and math.isnan(report.score)
    assert "all ties" in report.score_undefined
    data = report.to_dict()
    assert data["score"] is None and "all ties" in data["score_undefined"]
    assert "undefined: every sample" in report.summary() and "nan" not in report.summary().split("\n")[0]
    defined = biasfast.bias_score(*_random_problem("l2", 9, 20, (5,), seed=8)[:4], metric="l2")
    assert defined.score_undefined is None and defined.to_dict()["score_undefined"] is None
