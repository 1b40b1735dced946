"""`bias_score`: does a diffusion model favour its own training data? (Biased Generalization, 2603.03469).

Two models are trained on disjoint sets A and B and sampled from shared noise, so sample j of A and of B
form a pair. Every number comes from exact nearest-neighbour searches (`biasfast.knn`) streamed over the
training sets: each training chunk is read once, searched for all samples at once, and only the running
(samples × k) nearest distances are kept, so nothing of size samples × training rows is ever held.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from biasfast.metrics import shards, stats
from biasfast._core.checks import ArrayLike, as_rows, check_finite
from biasfast._core.constants import METRICS
from biasfast.metrics.features import Embedding, device_of
from biasfast.metrics.search import NearestDistances, SearchPlan, TrainingSet, nearest, searchable

GAP_THRESHOLD = 1.0 / 3.0  # d1/d2 below this marks a memorized sample (Yoon et al.; Bonnaire et al.)
NN_BINS = 20
ALL_TIES = ("every sample is exactly as near its own training set as the other one (all ties), so the score is "
            "undefined")  # histogram bins of the NN divergence, as the paper's nn_divergence.py


class PairDistance(NamedTuple):
    """Summary of d(a_j, b_j) over the sample pairs; sem = std (ddof 1) / sqrt(n)."""

    mean: float
    median: float
    sem: float


@dataclass(frozen=True)
class BiasReport:
    """Everything `bias_score` measured. Per-sample tensors: float64, shape (2, n), row 0 model A, row 1 model B."""

    score: float  # 2·P(d_own < d_cross) − 1 over both models' samples, ties excluded
    score_ci: tuple[float, float]  # 95% Wilson interval on the score scale
    p_value: float  # exact two-sided binomial test of P(d_own < d_cross) = 1/2, ties excluded
    pair_distance: PairDistance
    own_nn: torch.Tensor  # distance to the nearest row of the sample's own training set
    cross_nn: torch.Tensor  # ... of the other model's training set
    proximity_gap: float  # mean(d_cross − d_own) / mean(d_cross)
    memorized_fraction: float  # share of samples with d1/d2 < 1/3 in their own training set
    nn_divergence: float | None  # KL(NN-distance histogram of samples ‖ of fresh test data), None without test
    n_samples: int  # samples per model (pairs)
    metric: str
    n_ties: int  # samples with d_own == d_cross, left out of score, score_ci and p_value
    score_undefined: str | None = None  # why score is NaN (all ties), None when it is a number

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None); `per_sample=False` leaves out own_nn and cross_nn."""
        out: dict[str, Any] = {
            "score": _json_float(self.score),
            "score_ci": [_json_float(v) for v in self.score_ci],
            "p_value": _json_float(self.p_value),
            "pair_distance": {k: _json_float(v) for k, v in self.pair_distance._asdict().items()},
            "proximity_gap": _json_float(self.proximity_gap),
            "memorized_fraction": _json_float(self.memorized_fraction),
            "nn_divergence": None if self.nn_divergence is None else _json_float(self.nn_divergence),
            "n_samples": self.n_samples,
            "metric": self.metric,
            "n_ties": self.n_ties,
            "score_undefined": self.score_undefined,
        }
        if per_sample:
            out["own_nn"] = self.own_nn.double().cpu().tolist()
            out["cross_nn"] = self.cross_nn.double().cpu().tolist()
        return out

    def summary(self) -> str:
        """A readable multi-line description."""
        low, high = self.score_ci
        pair = self.pair_distance
        headline = (f"undefined: {self.score_undefined}" if self.score_undefined else
                    f"{self.score:+.4f}  (95% CI {low:+.4f} … {high:+.4f}, p = {self.p_value:.3g})")
        lines = [
            f"bias score        {headline}",
            f"                  0 = unbiased, +1 = every sample nearer its own training set; {self.n_ties} ties",
            f"pair distance     mean {pair.mean:.4g}, median {pair.median:.4g}, sem {pair.sem:.2g} ({self.metric})",
            f"proximity gap     {self.proximity_gap:+.4f}  (mean(d_cross − d_own) / mean(d_cross))",
            f"memorized         {100 * self.memorized_fraction:.2f}% of samples (d1/d2 < 1/3)",
        ]
        if self.nn_divergence is not None:
            lines.append(f"NN divergence     {self.nn_divergence:.4g}  (KL of NN-distance histograms vs test data)")
        lines.append(f"samples           {self.n_samples} per model, {2 * self.n_samples} in all")
        return "\n".join(lines)


def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# ---- per-pair distances (exact, float64, O(chunk · features) memory) -----------------------------


def _paired_distances(a: torch.Tensor, b: torch.Tensor, metric: str, block: int = 1024) -> torch.Tensor:
    """d(a_j, b_j) for each row j, in float64."""
    out = []
    for start in range(0, a.shape[0], block):
        x, y = a[start : start + block], b[start : start + block]
        if metric == "hamming":
            out.append((x != y).sum(dim=1).double())
            continue
        x, y = x.double(), y.double()
        if metric in ("l2", "sqeuclidean"):
            squared = ((x - y) ** 2).sum(dim=1)
            out.append(squared.sqrt() if metric == "l2" else squared)
            continue
        if metric == "pearson":
            x, y = x - x.mean(dim=1, keepdim=True), y - y.mean(dim=1, keepdim=True)
        cosine = (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1))  # norms > 0: checked by bias_score
        out.append((1.0 - cosine).clamp_min(0.0))  # rounding can push 1 − cos(x, x) below 0
    return torch.cat(out)


# ---- the report --------------------------------------------------------------------------------


def _check_rows(rows: torch.Tensor, name: str, metric: str) -> None:
    """NaN/Inf, and rows whose cosine/pearson distance is undefined (zero, or constant), named by argument and row.

    One cheap reduction pass per check; the exact scan runs only when the reduction flags something.
    """
    if not rows.is_floating_point():
        return
    if not torch.isfinite(rows.sum(dim=1, dtype=torch.float64)).all():
        check_finite(rows, name)
    if metric in ("cosine", "pearson"):
        low, high = torch.aminmax(rows, dim=1)
        flat = (low == high) if metric == "pearson" else (low == 0) & (high == 0)
        if flat.any():
            what = "constant" if metric == "pearson" else "all zero"
            raise ValueError(f"{name}: row {int(flat.nonzero()[0, 0])} is {what}, so its {metric} distance is undefined")


def _sign_statistics(own: torch.Tensor, cross: torch.Tensor) -> tuple[float, tuple[float, float], float, int]:
    """score, its Wilson CI, the binomial p-value and the number of ties, with ties left out."""
    wins = int((own < cross).sum())
    losses = int((own > cross).sum())
    ties = own.numel() - wins - losses
    trials = wins + losses
    if trials == 0:
        warnings.warn(f"bias_score: {ALL_TIES}", stacklevel=3)
        return math.nan, (-1.0, 1.0), 1.0, ties
    low, high = stats.wilson_interval(wins, trials)
    return 2 * wins / trials - 1, (2 * low - 1, 2 * high - 1), stats.binomial_test_half(wins, trials), ties


def _memorized_fraction(gap: torch.Tensor) -> float:
    """Share with d1/d2 < 1/3; d1 = d2 = 0 (a copy of a duplicated training row) counts as memorized."""
    d1, d2 = gap[:, 0].double(), gap[:, 1].double()
    memorized = torch.where(d2 > 0, d1 / d2.clamp_min(1e-300) < GAP_THRESHOLD, d1 == 0)
    return float(memorized.double().mean())


def _nn_divergence(generated: torch.Tensor, fresh: torch.Tensor, metric: str, features: int, bins: int) -> float:
    """KL between NN-distance histograms on [0, upper]: upper = sequence length for hamming (as the paper),
    the largest distance seen otherwise."""
    generated, fresh = (v.double().clamp_min(0).cpu().numpy() for v in (generated, fresh))
    upper = float(features) if metric == "hamming" else float(max(generated.max(), fresh.max()))
    return stats.sample_histogram_kl(generated, fresh, upper if upper > 0 else 1.0, bins)


def _check_overlap(hashes_a: torch.Tensor, hashes_b: torch.Tensor) -> None:
    """A shared row is a warning; training sets of which one lies entirely inside the other are an error: every
    sample would be as near one set as the other, so the score would measure nothing."""
    shared = torch.isin(hashes_b, hashes_a)
    count = int(shared.sum())
    if count and (count == hashes_b.numel() or bool(torch.isin(hashes_a, hashes_b).all())):
        raise ValueError(
            f"train_a, train_b: the training sets overlap entirely ({count} of train_b's {hashes_b.numel()} rows "
            f"are rows of train_a's {hashes_a.numel()}); the bias score needs two disjoint training sets")
    if count:
        first = int(shared.nonzero()[0, 0])
        warnings.warn(
            f"train_a and train_b share {count} identical row(s) (first: train_b row {first}); the bias score "
            "assumes disjoint training sets, and samples near shared rows tie between own and cross",
            UserWarning,
            stacklevel=3,
        )


def bias_score(
    samples_a: ArrayLike,
    samples_b: ArrayLike,
    train_a: TrainingSet,
    train_b: TrainingSet,
    *,
    metric: str = "pearson",
    test: ArrayLike | None = None,
    group: Any = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> BiasReport:
    """Measure how much two models trained on disjoint sets A and B favour their own training data.

    samples_a[j] and samples_b[j] must come from the same initial and per-step noise (paired sampling).
    Inputs are tensors or numpy arrays of shape (n, ...) on any device; training sets may also be iterables
    of chunks, each read once (streamed to the samples' device). `metric` is one of METRICS ("pearson":
    1 − correlation of the flattened images, the paper's similarity; "hamming" for token sequences).
    `test`: fresh data from the same distribution, for the NN divergence (baseline: the test rows' nearest
    distances in train_a and in train_b). `group`: a torch.distributed group when each rank holds a shard of
    train_a and train_b (the same samples on every rank); every rank then returns the whole sets' report.

    Ties d_own == d_cross (e.g. a copy of a row both training sets contain) favour neither set: like the sign
    test, score, score_ci and p_value leave them out, and n_ties counts them. The gap ratio d1/d2 of
    memorized_fraction uses Euclidean distances on the raw values whatever `metric` is, as the official
    `compute_fmem.py` (Hamming for token data, where Euclidean distances between token ids mean nothing).

    `features`: an embedding (module or callable mapping a batch of images (B, ...) to (B, d) rows), applied in
    batches on the samples' device to the samples, the test set and every training chunk (streamed) before the
    search; every distance, the gap ratio included, is then measured between embeddings. The overlap warning
    compares embedded rows, so it only sees copies the embedding maps bit-identically. Default: raw values.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: unknown metric {metric!r}; expected one of {METRICS}")
    if features is not None:
        embedding = Embedding(features, device_of(samples_a))
        samples_a, samples_b = embedding(samples_a, "samples_a"), embedding(samples_b, "samples_b")
        test = None if test is None else embedding(test, "test")
        train_a, train_b = embedding.stream(train_a, "train_a"), embedding.stream(train_b, "train_b")
    a = searchable(as_rows(samples_a, "samples_a", allow_empty=True), metric, "samples_a")
    b = searchable(as_rows(samples_b, "samples_b", allow_empty=True).to(a.device), metric, "samples_b")
    n, features = a.shape
    if n == 0:
        raise ValueError("samples_a: no samples")
    if features == 0:  # no distance is defined between empty rows (and the search would blame a training set)
        raise ValueError(f"samples_a: the samples have no features (shape {tuple(a.shape)} as rows)")
    if b.shape[0] != n:
        raise ValueError(f"samples_b: {b.shape[0]} samples, but samples_a has {n}; samples must be paired")
    if b.shape[1] != features:
        raise ValueError(f"samples_b: feature size {b.shape[1]} does not match samples_a's {features}")
    parts = [a, b]
    if test is not None:
        fresh = searchable(as_rows(test, "test", allow_empty=True).to(a.device), metric, "test")
        if fresh.shape[1] != features:
            raise ValueError(f"test: feature size {fresh.shape[1]} does not match the samples' {features}")
        if fresh.shape[0] == 0:
            raise ValueError("test: no rows")
        parts.append(fresh)
    dtype = parts[0].dtype
    for part in parts[1:]:
        dtype = torch.promote_types(dtype, part.dtype)
    queries = torch.cat([p.to(dtype) for p in parts])
    for name, part in zip(("samples_a", "samples_b", "test"), parts):
        _check_rows(part, name, metric)

    plan = SearchPlan(metric)

    def search() -> tuple[NearestDistances, NearestDistances]:
        return (nearest(train_a, "train_a", queries, slice(0, n), plan, features),
                nearest(train_b, "train_b", queries, slice(n, 2 * n), plan, features))

    near_a, near_b = search() if group is None else shards.search_shards(search, queries, group)
    for name, near in (("train_a", near_a), ("train_b", near_b)):
        if near.rows < 2:
            raise ValueError(f"{name}: needs at least 2 training rows (the gap ratio uses the two nearest), "
                             f"got {near.rows}")
    _check_overlap(near_a.hashes, near_b.hashes)

    own = torch.stack([near_a.metric[:n, 0], near_b.metric[n : 2 * n, 0]])
    cross = torch.stack([near_b.metric[:n, 0], near_a.metric[n : 2 * n, 0]])
    score, score_ci, p_value, ties = _sign_statistics(own, cross)
    pairs = _paired_distances(a, b, metric)
    sem = float(pairs.std() / math.sqrt(n)) if n > 1 else math.nan
    own64, cross64 = own.double(), cross.double()
    mean_cross = float(cross64.mean())
    gap_ratio_rows = torch.cat([near_a.gap, near_b.gap])
    divergence = None
    if test is not None:
        fresh_nn = torch.cat([near_a.metric[2 * n :, 0], near_b.metric[2 * n :, 0]])
        divergence = _nn_divergence(own.flatten(), fresh_nn, metric, features, NN_BINS)
    return BiasReport(
        score=score,
        score_ci=score_ci,
        p_value=p_value,
        pair_distance=PairDistance(float(pairs.mean()), float(np.median(pairs.cpu().numpy())), sem),
        own_nn=own,
        cross_nn=cross,
        proximity_gap=float((cross64 - own64).mean()) / mean_cross if mean_cross > 0 else math.nan,
        memorized_fraction=_memorized_fraction(gap_ratio_rows),
        nn_divergence=divergence,
        n_samples=n,
        metric=metric,
        n_ties=ties,
        score_undefined=ALL_TIES if math.isnan(score) else None,
    )
