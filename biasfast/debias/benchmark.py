"""The colored-digits debiasing benchmark: every method in one harness, metrics over seeds, the DEBIAS.md table."""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import math
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from biasfast._core.buildinfo import cpu_model
from biasfast.data.colored_digits import ALIGNED_RATIOS, ColoredDigits, colored_digits, read_colour
from biasfast.debias.amplifier import BiasAmplifier
from biasfast.debias.classifier import ClassifierConfig
from biasfast.debias.evaluation import FLAG_METRICS, GROUP_METRICS, evaluate, flag_quality, summarize_runs
from biasfast.debias.recipes import recipe_one, recipe_two, train_erm, train_jtt, train_lff
from biasfast.metrics.stats import mean_std

BASELINES = ("erm", "lff", "jtt", "ddb-real")
METHODS = ("erm", "lff", "jtt", "ddb-real-1", "ddb-real-2", "ddb-1", "ddb-2")

SyntheticSource = Callable[[ColoredDigits, int], tuple[torch.Tensor, torch.Tensor]]
"""(data, seed) → synthetic (images, labels) for the amplifier; see biasfast.debias.synthetic."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes of one benchmark run; `quick()` is the CI-sized variant."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = ALIGNED_RATIOS
    repeats: int = 3
    classifier: ClassifierConfig = ClassifierConfig(epochs=16, lr=3e-3)
    amplifier: ClassifierConfig = ClassifierConfig(epochs=50, lr=3e-3)  # long enough that a real-data BA memorises
    width: int = 8
    group_dro_step_size: float = 0.01
    jtt_up_weight: int = 20

    @classmethod
    def quick(cls) -> "BenchmarkConfig":
        return cls(ratios=(0.99,), repeats=2, classifier=ClassifierConfig(epochs=12, lr=3e-3),
                   amplifier=ClassifierConfig(epochs=20, lr=3e-3))


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


def _amplifier_data(
    data: ColoredDigits, source: str, seed: int, synthetic: SyntheticSource | None, cache: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """The amplifier's training images: the real training split ("real") or synthetic ones (made once, cached)."""
    if source == "real":
        return data.train.images, data.train.labels
    if "synthetic-data" not in cache:
        if synthetic is None:
            raise ValueError("synthetic: DDB needs a synthetic-data source (a diffusion generator)")
        cache["synthetic-data"] = synthetic(data, seed)
    return cache["synthetic-data"]


def _new_amplifier(data: ColoredDigits, seed: int, config: BenchmarkConfig, epochs: int) -> BiasAmplifier:
    return BiasAmplifier(in_channels=data.train.images.shape[1], width=config.width,
                         config=replace(config.amplifier, epochs=epochs), seed=seed + 20_000)


def _fitted_amplifier(
    data: ColoredDigits, source: str, seed: int, config: BenchmarkConfig, synthetic: SyntheticSource | None,
    cache: dict, log: Callable[[str], None] | None = None,
) -> BiasAmplifier:
    """Recipe I's BA, fitted once per source for as many optimiser steps as `config.amplifier.epochs` epochs of
    the real training set (a fair ablation whatever the synthetic size)."""
    if source in cache:
        return cache[source]
    images, labels = _amplifier_data(data, source, seed, synthetic, cache)
    epochs = max(1, round(config.amplifier.epochs * len(data.train) / labels.numel()))
    amplifier = cache[source] = _new_amplifier(data, seed, config, epochs).fit(images, labels)
    if log is not None:  # diagnostics only: bias labels never reach training
        flagged = amplifier.predict_conflicting(data.train.images, data.train.labels)
        truth = ~data.train.aligned
        log(f"  ratio {data.ratio} seed {seed} {source} BA: training images colour-aligned "
            f"{(read_colour(images) == labels).float().mean():.3f}; flags {int(flagged.sum())} real samples, "
            f"{int((flagged & truth).sum())} of {int(truth.sum())} truly conflicting")
    return amplifier


def amplifier_flag_quality(amplifier: BiasAmplifier, data: ColoredDigits) -> dict[str, float]:
    """Precision/recall of Recipe I's pseudo bias-conflicting flags on the real training split (diagnostic)."""
    flagged = amplifier.predict_conflicting(data.train.images, data.train.labels)
    return flag_quality(flagged, ~data.train.aligned)


def run_method(
    data: ColoredDigits, method: str, seed: int, config: BenchmarkConfig,
    synthetic: SyntheticSource | None = None, cache: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train one method on data.train (selecting on data.val) and evaluate on the unbiased test split.

    `cache` keeps the synthetic images and the fitted Recipe I amplifiers across the methods of one (ratio, seed).
    Recipe I methods also return their amplifier's flag precision/recall (`FLAG_METRICS`)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    common = dict(config=config.classifier, seed=seed, width=config.width)
    cache = {} if cache is None else cache
    if method == "erm":
        model = train_erm(data.train, data.val, **common)
    elif method == "lff":
        model = train_lff(data.train, data.val, **common)
    elif method == "jtt":
        model = train_jtt(data.train, data.val, up_weight=config.jtt_up_weight, **common)
    elif method.endswith("-1"):
        source = "real" if method.startswith("ddb-real") else "synthetic"
        amplifier = _fitted_amplifier(data, source, seed, config, synthetic, cache, log)
        model = recipe_one(data.train, amplifier, data.val, step_size=config.group_dro_step_size, **common)
        return evaluate(model, data.test) | amplifier_flag_quality(amplifier, data)
    else:
        source = "real" if method.startswith("ddb-real") else "synthetic"
        images, labels = _amplifier_data(data, source, seed, synthetic, cache)
        amplifier = _new_amplifier(data, seed, config, config.classifier.epochs)
        model = recipe_two(data.train, amplifier, images, labels, data.val, **common)
    return evaluate(model, data.test)


def _run_cell(
    ratio: float, seed: int, methods: tuple[str, ...], config: BenchmarkConfig, synthetic: SyntheticSource | None,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """Every method on one (ratio, seed) dataset, sharing its synthetic images and Recipe I amplifiers."""
    data = colored_digits(ratio, seed=seed, repeats=config.repeats)
    cache: dict = {}
    out = {}
    for method in methods:
        start, cpu = time.perf_counter(), time.process_time()
        out[method] = run_method(data, method, seed, config, synthetic, cache, log)
        log(f"ratio {ratio} seed {seed} {method:10s} {time.perf_counter() - start:6.1f}s "
            f"(cpu {time.process_time() - cpu:5.1f}s)  " + "  ".join(f"{k} {v:.3f}" for k, v in out[method].items()))
    return out


def _run_cell_in_worker(*args) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    return _run_cell(*args, functools.partial(print, flush=True))


def run_benchmark(
    methods: tuple[str, ...], config: BenchmarkConfig, synthetic: SyntheticSource | None = None,
    log: Callable[[str], None] = print, jobs: int = 1,
) -> dict[float, dict[str, list[dict[str, float]]]]:
    """results[ratio][method] = per-seed metrics; data are rebuilt per (ratio, seed).

    `jobs` > 1 runs the (ratio, seed) cells in that many single-threaded worker processes (the models are tiny,
    so processes scale where intra-op threads do not); results do not depend on `jobs`."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected a positive int, got {jobs!r}")
    cells = [(ratio, seed) for ratio in config.ratios for seed in config.seeds]
    if jobs == 1:
        outputs = [_run_cell(ratio, seed, methods, config, synthetic, log) for ratio, seed in cells]
    else:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            outputs = list(pool.map(_run_cell_in_worker, *zip(*[(r, s, methods, config, synthetic) for r, s in cells])))
    results: dict[float, dict[str, list[dict[str, float]]]] = {r: {m: [] for m in methods} for r in config.ratios}
    for (ratio, _), by_method in zip(cells, outputs):
        for method, metrics in by_method.items():
            results[ratio][method].append(metrics)
    return results


def _percent(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_table(results: dict[float, dict[str, list[dict[str, float]]]]) -> str:
    """Accuracies, then the Recipe I amplifier's flag precision/recall ("–" for methods without one)."""
    columns = GROUP_METRICS + FLAG_METRICS
    lines = ["| aligned ratio | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for ratio, by_method in results.items():
        for method, runs in by_method.items():
            summary = summarize_runs(runs)
            cells = " | ".join(_percent(*summary[k]) if k in summary else "–" for k in columns)
            lines.append(f"| {ratio} | {method} | {cells} |")
    return "\n".join(lines)


PAIRS = (("ddb-1", "ddb-real-1"), ("ddb-2", "ddb-real-2"))


def format_paired_differences(
    results: dict[float, dict[str, list[dict[str, float]]]], metrics: tuple[str, ...] = ("unbiased", "worst_group")
) -> str:
    """DDB minus its real-data-amplifier twin, per seed (runs are in seed order for every method), in points."""
    lines = []
    for ratio, by_method in results.items():
        for method, baseline in PAIRS:
            if method not in by_method or baseline not in by_method:
                continue
            parts = []
            for metric in metrics:
                diffs = [100 * (a[metric] - b[metric]) for a, b in zip(by_method[method], by_method[baseline])]
                mean, std = mean_std(diffs)
                spread = "" if std is None else f" ± {std:.1f}"
                parts.append(f"{metric} " + ", ".join(f"{d:+.1f}" for d in diffs) + f" (mean {mean:+.1f}{spread})")
            lines.append(f"- ratio {ratio}, {method} − {baseline} per seed: " + "; ".join(parts))
    return "\n".join(lines)


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def table_report(
    results: dict, *, command: str, elapsed_s: float, cpu_s: float, config: BenchmarkConfig, notes: str = ""
) -> str:
    seeds = ", ".join(map(str, config.seeds))
    return (
        "# Debiasing on colored digits\n\n"
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB ({platform.machine()}), torch"
        f" {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- command: `{command}`\n"
        f"- wall time: {elapsed_s / 60:.1f} min; CPU time (user + system, all processes): {cpu_s / 60:.1f} min\n"
        f"- load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
        f"- seeds: {seeds} (mean ± std over seeds, accuracies in %); test = every test digit in all 10 colours\n\n"
        "unbiased = mean accuracy over the 100 (class, colour) cells; aligned / conflicting = mean of the diagonal /"
        " off-diagonal cells; worst_group = min over the 20 (class × aligned/conflicting) groups.\n\n"
        + format_table(results) + "\n\n"
        "flag_precision / flag_recall: Recipe I's pseudo bias-conflicting flags (the amplifier misclassifies the real"
        " training sample) against the true bias-conflicting samples of the training split.\n\n"
        + format_paired_differences(results) + "\n" + (f"\n{notes}\n" if notes else "")
    )


def with_overrides(config: BenchmarkConfig, **overrides) -> BenchmarkConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
