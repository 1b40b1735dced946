"""bias_score end to end vs faiss-cpu running the same exact searches (issue: bias_score, Performance).

Full: n = 10,000 paired samples of 3×32×32 against two 50,000-image training sets, metric "pearson":
per training set one k=1 search of all 2n samples and one k=2 Euclidean search of the n own samples (the
gap ratio). faiss does the same with IndexFlatIP on standardised, normalised rows and IndexFlatL2.
extra_info records the share of time spent outside the kNN calls (target ≤ 10%) and the peak RSS growth
during the call next to the size of one n × N float32 matrix (which must never be held).
"""

import threading
import time

import pytest
import torch

import biasfast
from benchmarks.conftest import QUICK, shapes

SHAPES = shapes(full=[(10_000, 50_000, (3, 32, 32))], quick=[(64, 500, (3, 4, 4))])


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
    if provider == "faiss":
        pytest.importorskip("faiss")
        bench(lambda: _faiss_searches(*data), provider="faiss", shape=label, rounds=1, warmup=0)
        return
    timings = []

    def run():
        with _PeakRss() as rss:
            _, total, inner = _bias_score_timed(*data)
        timings.append((total, inner, rss.peak - rss.base))

    bench(run, provider="biasfast", shape=label, rounds=1, warmup=0)
    total, inner, rss_growth = min(timings)
    matrix_bytes = n * n_train * 4
    benchmark.extra_info.update(total_s=total, knn_s=inner, outside_knn_share=1 - inner / total,
                                peak_rss_growth_bytes=rss_growth, n_by_N_matrix_bytes=matrix_bytes)
    if not QUICK:
        assert rss_growth < matrix_bytes / 2, "bias_score held something the size of an n × N matrix"
