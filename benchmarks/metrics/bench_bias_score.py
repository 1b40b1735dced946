"""bias_score end to end vs faiss-cpu running the same exact searches (the performance target of bias_score).

Full: n = 10,000 paired samples of 3×32×32 against two 50,000-image training sets, metric "pearson":
per training set one k=1 search of all 2n samples and one k=2 Euclidean search of the n own samples (the
gap ratio). faiss does the same with IndexFlatIP on standardised, normalised rows and IndexFlatL2.
extra_info records the share of time spent outside the kNN calls (target ≤ 10%) and the peak RSS growth
during the call next to the size of one n × N float32 matrix (which must never be held).
"""

import statistics
import threading
import time

import pytest
import torch

import biasfast
from benchmarks.conftest import QUICK, rotating_rounds, shapes

# "tenth": n and N both 10x smaller (100x less work), for runs where the full size does not fit the time.
SHAPES = shapes(
    full=[pytest.param(10_000, 50_000, (3, 32, 32), id="full"), pytest.param(1_000, 5_000, (3, 32, 32), id="tenth")],
    quick=[pytest.param(64, 500, (3, 4, 4), id="quick")],
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class _PeakRss:
    """Samples the resident set size every 5 ms while active."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _data(n, n_train, shape):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(rows, *shape, generator=g) for rows in (n, n, n_train, n_train)]


def _bias_score_timed(samples_a, samples_b, train_a, train_b):
    """bias_score with the time spent inside biasfast.knn measured separately."""
    inner, knn = [0.0], biasfast.knn

    def timed_knn(*args, **kwargs):
        start = time.perf_counter()
        try:
            return knn(*args, **kwargs)
        finally:
            inner[0] += time.perf_counter() - start

    biasfast.knn = timed_knn
    try:
        start = time.perf_counter()
        report = biasfast.bias_score(samples_a, samples_b, train_a, train_b, metric="pearson")
        total = time.perf_counter() - start
    finally:
        biasfast.knn = knn
    return report, total, inner[0]


def _faiss_searches(samples_a, samples_b, train_a, train_b):
    import faiss

    def unit_rows(x):  # "pearson" = 1 − cosine of per-row standardised vectors
        x = x.flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(x, dim=1).numpy()

    queries = unit_rows(torch.cat([samples_a, samples_b]))
    out = []
    for samples, train in ((samples_a, train_a), (samples_b, train_b)):
        inner = faiss.IndexFlatIP(queries.shape[1])
        inner.add(unit_rows(train))
        out.append(inner.search(queries, 1))
        euclid = faiss.IndexFlatL2(queries.shape[1])
        euclid.add(train.flatten(1).numpy())
        out.append(euclid.search(samples.flatten(1).numpy(), 2))
    return out


@pytest.mark.parametrize("provider", ["biasfast", "faiss"])
@pytest.mark.parametrize("n,n_train,shape", SHAPES)
def test_bias_score(bench, benchmark, provider, n, n_train, shape):
    benchmark.group = f"bias_score {n} pairs x 2x{n_train} x {'x'.join(map(str, shape))}"
    data = _data(n, n_train, shape)
    label = f"{n}x2x{n_train}x{'x'.join(map(str, shape))}"
    rounds = 1 if n >= 10_000 else 3  # the full size takes minutes per call on 2 cores
    if provider == "faiss":
        pytest.importorskip("faiss")
        bench(lambda: _faiss_searches(*data), provider="faiss", shape=label, rounds=rounds, warmup=0)
        return
    timings = []

    def run():
        with _PeakRss() as rss:
            _, total, inner = _bias_score_timed(*data)
        timings.append((total, inner, rss.peak - rss.base))

    bench(run, provider="biasfast", shape=label, rounds=rounds, warmup=0)
    total, inner, rss_growth = min(timings)
    matrix_bytes = n * n_train * 4
    budget = (256 << 20) + 3 * (data[0].nbytes + data[1].nbytes)  # kNN workspace + copies of the samples
    benchmark.extra_info.update(total_s=total, knn_s=inner, outside_knn_share=1 - inner / total,
                                peak_rss_growth_bytes=rss_growth, n_by_N_matrix_bytes=matrix_bytes,
                                memory_budget_bytes=budget)
    if not QUICK:
        assert rss_growth < budget, f"bias_score grew RSS by {rss_growth} B, more than workspace + samples ({budget} B)"
    if n >= 10_000:
        assert rss_growth < matrix_bytes / 2, "bias_score held something the size of an n × N matrix"


@pytest.mark.parametrize("n,n_train,shape", SHAPES)
def test_bias_score_paired_with_faiss(benchmark, n, n_train, shape):
    """bias_score and faiss's searches in alternating order (rotating_rounds): the median per-pair ratio survives
    this machine's drift, which separately timed groups do not. Two pairs at the full size (~9 min)."""
    pytest.importorskip("faiss")
    benchmark.group = f"bias_score paired with faiss {n} pairs x 2x{n_train}"
    data = _data(n, n_train, shape)
    pairs = 1 if QUICK else 2 if n >= 10_000 else 5
    calls = {"biasfast": lambda: _bias_score_timed(*data), "faiss": lambda: _faiss_searches(*data)}
    times, outputs = rotating_rounds(benchmark, calls, pairs)
    knn_timings = [out[1:] for out in outputs["biasfast"]]  # (total, inside kNN) of each bias_score call
    ratios = [f / b for f, b in zip(times["faiss"], times["biasfast"])]
    total, inner = min(knn_timings)
    benchmark.extra_info.update(pairs=pairs, median_ratio_vs_faiss=statistics.median(ratios), ratios=ratios,
                                outside_knn_share=1 - inner / total)
    print(f"\n{n}x2x{n_train}: faiss/biasfast per pair {', '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f}; biasfast {min(times['biasfast']):.2f} s, faiss "
          f"{min(times['faiss']):.2f} s; outside kNN {100 * (1 - inner / total):.1f}% (fastest call)")
