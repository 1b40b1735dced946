"""The colored-digits debiasing benchmark: every method in one harness, metrics over seeds, the DEBIAS.md table."""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from biasfast.data.colored_digits import ALIGNED_RATIOS, ColoredDigits, colored_digits, read_colour
from biasfast.debias.amplifier import BiasAmplifier
from biasfast.debias.classifier import TrainConfig
from biasfast.debias.evaluation import METRICS, evaluate, mean_std
from biasfast.debias.recipes import recipe_one, recipe_two, train_erm, train_jtt, train_lff

BASELINES = ("erm", "lff", "jtt", "ddb-real")
METHODS = ("erm", "lff", "jtt", "ddb-real-1", "ddb-real-2", "ddb-1", "ddb-2")

SyntheticSource = Callable[[ColoredDigits, int], tuple[torch.Tensor, torch.Tensor]]
"""(data, seed) → synthetic (images, labels) for the amplifier; see biasfast.debias.synthetic."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes of one benchmark run; `quick()` is the CI-sized variant."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = ALIGNED_RATIOS
    repeats: int = 5
    classifier: TrainConfig = TrainConfig(epochs=12)
    amplifier: TrainConfig = TrainConfig(epochs=12)
    width: int = 16
    group_dro_step_size: float = 0.01
    jtt_up_weight: int = 20

    @classmethod
    def quick(cls) -> "BenchmarkConfig":
        fast = TrainConfig(epochs=8, lr=3e-3)
        return cls(seeds=(0, 1, 2), ratios=(0.99,), repeats=2, classifier=fast, amplifier=fast, width=8)


def method_name(recipe: int | None, baseline: str | None) -> str:
    """CLI choice → method: `--recipe R` alone is DDB Recipe R; `--baseline ddb-real` takes `--recipe` (default 1)."""
    if baseline is None:
        if recipe not in (1, 2):
            raise ValueError(f"recipe: expected 1 or 2, got {recipe!r}")
        return f"ddb-{recipe}"
    if baseline not in BASELINES:
        raise ValueError(f"baseline: expected one of {BASELINES}, got {baseline!r}")
    if baseline == "ddb-real":
        return f"ddb-real-{recipe or 1}"
    if recipe is not None:
        raise ValueError(f"recipe: --recipe applies to DDB and ddb-real only, not to the {baseline!r} baseline")
    return baseline


def _amplifier(
    data: ColoredDigits, source: str, seed: int, config: BenchmarkConfig, synthetic: SyntheticSource | None,
    log: Callable[[str], None] | None = None,
) -> BiasAmplifier:
    """Fit a BA on the real training images ("real") or on synthetic ones, for as many optimiser steps as
    `config.amplifier.epochs` epochs of the real training set (a fair ablation whatever the synthetic size)."""
    if source == "real":
        images, labels = data.train.images, data.train.labels
    else:
        if synthetic is None:
            raise ValueError("synthetic: DDB needs a synthetic-data source (a diffusion generator)")
        images, labels = synthetic(data, seed)
    epochs = max(1, round(config.amplifier.epochs * len(data.train) / labels.numel()))
    amplifier = BiasAmplifier(in_channels=data.train.images.shape[1], width=config.width,
                              config=replace(config.amplifier, epochs=epochs), seed=seed + 20_000).fit(images, labels)
    if log is not None:  # diagnostics only: bias labels never reach training
        flagged = amplifier.predict_conflicting(data.train.images, data.train.labels)
        truth = ~data.train.aligned
        log(f"  {source} BA: training images colour-aligned {(read_colour(images) == labels).float().mean():.3f}; "
            f"flags {int(flagged.sum())} real samples, {int((flagged & truth).sum())} of {int(truth.sum())} "
            "truly conflicting")
    return amplifier


def run_method(
    data: ColoredDigits, method: str, seed: int, config: BenchmarkConfig,
    synthetic: SyntheticSource | None = None, amplifiers: dict[str, BiasAmplifier] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train one method on data.train (selecting on data.val) and evaluate on the unbiased test split.

    `amplifiers` caches the BA per source ("real"/"synthetic") across the recipes of one (ratio, seed)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    common = dict(config=config.classifier, seed=seed, width=config.width)
    if method == "erm":
        model = train_erm(data.train, data.val, **common)
    elif method == "lff":
        model = train_lff(data.train, data.val, **common)
    elif method == "jtt":
        model = train_jtt(data.train, data.val, up_weight=config.jtt_up_weight, **common)
    else:
        source = "real" if method.startswith("ddb-real") else "synthetic"
        amplifiers = {} if amplifiers is None else amplifiers
        if source not in amplifiers:
            amplifiers[source] = _amplifier(data, source, seed, config, synthetic, log)
        if method.endswith("-1"):
            model = recipe_one(data.train, amplifiers[source], data.val, step_size=config.group_dro_step_size,
                               **common)
        else:
            model = recipe_two(data.train, amplifiers[source], data.val, **common)
    return evaluate(model, data.test)


def run_benchmark(
    methods: tuple[str, ...], config: BenchmarkConfig, synthetic: SyntheticSource | None = None,
    log: Callable[[str], None] = print,
) -> dict[float, dict[str, list[dict[str, float]]]]:
    """results[ratio][method] = per-seed metrics; data are rebuilt per (ratio, seed)."""
    results: dict[float, dict[str, list[dict[str, float]]]] = {}
    for ratio in config.ratios:
        results[ratio] = {m: [] for m in methods}
        for seed in config.seeds:
            data = colored_digits(ratio, seed=seed, repeats=config.repeats)
            amplifiers: dict[str, BiasAmplifier] = {}
            for method in methods:
                start = time.perf_counter()
                metrics = run_method(data, method, seed, config, synthetic, amplifiers, log)
                results[ratio][method].append(metrics)
                log(f"ratio {ratio} seed {seed} {method:10s} {time.perf_counter() - start:6.1f}s  "
                    + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return results


def format_table(results: dict[float, dict[str, list[dict[str, float]]]]) -> str:
    lines = ["| aligned ratio | method | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for ratio, by_method in results.items():
        for method, runs in by_method.items():
            stats = mean_std(runs)
            cells = " | ".join(f"{100 * stats[k][0]:.1f} ± {100 * stats[k][1]:.1f}" for k in METRICS)
            lines.append(f"| {ratio} | {method} | {cells} |")
    return "\n".join(lines)


def table_report(results: dict, *, command: str, elapsed_s: float, config: BenchmarkConfig, notes: str = "") -> str:
    seeds = ", ".join(map(str, config.seeds))
    return (
        "# Debiasing on colored digits\n\n"
        f"- machine: AMD EPYC 2-core, 24 GiB ({platform.processor() or platform.machine()}), torch {torch.__version__},"
        f" {torch.get_num_threads()} thread(s)\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: `{command}`\n"
        f"- wall time: {elapsed_s / 60:.1f} min\n"
        f"- seeds: {seeds} (mean ± std over seeds, accuracies in %); test = every test digit in all 10 colours\n\n"
        "unbiased = mean accuracy over the 100 (class, colour) cells; aligned / conflicting = mean of the diagonal /"
        " off-diagonal cells; worst_group = min over the 20 (class × aligned/conflicting) groups.\n\n"
        + format_table(results) + "\n" + (f"\n{notes}\n" if notes else "")
    )


def with_overrides(config: BenchmarkConfig, **overrides) -> BenchmarkConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
