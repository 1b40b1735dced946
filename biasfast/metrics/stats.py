"""Small exact statistics for every measure and table: mean ± spread (one convention), Wilson interval, binomial
test, histogram KL.

Plain float64 NumPy, no SciPy: the package only depends on torch and numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

Z_95 = 1.959963984540054  # standard-normal quantile at 0.975


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_test_half(successes: int, trials: int) -> float:
    """Exact two-sided binomial test of H0: p = 1/2.

    The null distribution is symmetric, so the usual "sum of outcomes no more likely than the observed
    one" p-value is 2·P(X ≤ min(k, n − k)), capped at 1. Summed in log space (exact for any n).
    """
    if trials == 0:
        return 1.0
    tail = min(successes, trials - successes)
    j = np.arange(1, tail + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(trials - j + 1) - np.log(j))])  # log C(n, i), i ≤ tail
    log_pmf = log_choose - trials * math.log(2.0)
    top = log_pmf.max()
    log_tail = top + math.log(np.exp(log_pmf - top).sum())
    return min(1.0, 2.0 * math.exp(log_tail))


def mean_std(values: Sequence[float] | torch.Tensor) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1) in float64; the deviation is None for a single value, which says
    nothing about the spread (never 0.0, which would claim a certainty there is none)."""
    data = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("values: no values to summarise")
    return float(data.mean()), float(data.std(ddof=1)) if data.size > 1 else None


def mean_se(values: Sequence[float] | torch.Tensor) -> tuple[float, float | None]:
    """Mean and standard error of the mean (std / √n); None for a single value, as `mean_std`."""
    mean, std = mean_std(values)
    count = len(values) if not isinstance(values, torch.Tensor) else values.numel()
    return mean, None if std is None else std / math.sqrt(count)


def histogram_kl(p: np.ndarray | torch.Tensor, q: np.ndarray | torch.Tensor) -> float:
    """KL(P ‖ Q) = Σ_b P(b) log(P(b)/Q(b)) of two normalised histograms, both clipped to [1e-8, 1] and not
    renormalised, as the paper's code (`nn_divergence.py`)."""
    p = np.clip(np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64), 1e-8, 1.0)
    q = np.clip(np.asarray(q.detach().cpu() if isinstance(q, torch.Tensor) else q, dtype=np.float64), 1e-8, 1.0)
    return float(np.sum(p * np.log(p / q)))


def sample_histogram_kl(p_values: np.ndarray, q_values: np.ndarray, upper: float, bins: int) -> float:
    """`histogram_kl` of the histograms of two samples on linspace(0, upper, bins + 1), as counts / total."""
    edges = np.linspace(0.0, upper, bins + 1)
    p_counts, _ = np.histogram(p_values, bins=edges)
    q_counts, _ = np.histogram(q_values, bins=edges)
    return histogram_kl(p_counts / max(p_counts.sum(), 1), q_counts / max(q_counts.sum(), 1))
