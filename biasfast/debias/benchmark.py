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


def _run_in_worker(run_cell, *args) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    return run_cell(*args, functools.partial(print, flush=True))


def run_benchmark(
    methods: tuple[str, ...], config: BenchmarkConfig, synthetic: SyntheticSource | None = None,
    log: Callable[[str], None] = print, jobs: int = 1,
) -> dict[float, dict[str, list[dict[str, float]]]]:
    """results[ratio][method] = per-seed metrics; data are rebuilt per (ratio, seed).

    `jobs` > 1 runs the (ratio, seed) cells in that many single-threaded worker processes (the models are tiny,
    so processes scale where intra-op threads do not); results do not depend on `jobs`."""
    return _run_cells(_run_cell, methods, config, synthetic, log, jobs)


ABLATION_GUIDANCE = (1.0, 2.0, 4.0)  # diffusers' s: no guidance, the paper's w = 1, and stronger
ABLATION_PER_CLASS = (400, 1000)


def ablation_name(guidance_scale: float, per_class: int) -> str:
    return f"ddb-1 s={guidance_scale:g} n={per_class}"


def _run_ablation_cell(
    ratio: float, seed: int, variants: tuple[tuple[float, int], ...], config: BenchmarkConfig, synthetic,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """Recipe I with the real-data amplifier, then with the synthetic one of every (guidance, set size) variant,
    one after the other so every variant reuses the cell's one trained generator."""
    data = colored_digits(ratio, seed=seed, repeats=config.repeats)
    out = {"ddb-real-1": run_method(data, "ddb-real-1", seed, config, None, {}, log)}
    for guidance_scale, per_class in variants:
        name = ablation_name(guidance_scale, per_class)
        source = synthetic.variant(guidance_scale=guidance_scale, per_class=per_class)
        out[name] = run_method(data, "ddb-1", seed, config, source, {}, log)
        log(f"ratio {ratio} seed {seed} {name}  " + "  ".join(f"{k} {v:.3f}" for k, v in out[name].items()))
    return out


def run_ablation(
    config: BenchmarkConfig, synthetic, log: Callable[[str], None] = print, jobs: int = 1,
    guidance: tuple[float, ...] = ABLATION_GUIDANCE, per_class: tuple[int, ...] = ABLATION_PER_CLASS,
) -> dict[float, dict[str, list[dict[str, float]]]]:
    """The paper's guidance × synthetic-set-size ablation of DDB Recipe I, beside ddb-real-1, per (ratio, seed);
    `synthetic` is a `DiffusionSource` (its `variant` makes the other settings)."""
    variants = tuple((g, n) for g in guidance for n in per_class)
    return _run_cells(_run_ablation_cell, variants, config, synthetic, log, jobs)


def _run_cells(run_cell, what, config: BenchmarkConfig, synthetic, log, jobs: int):
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected a positive int, got {jobs!r}")
    cells = [(ratio, seed) for ratio in config.ratios for seed in config.seeds]
    if jobs == 1:
        outputs = [run_cell(ratio, seed, what, config, synthetic, log) for ratio, seed in cells]
    else:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            outputs = list(pool.map(functools.partial(_run_in_worker, run_cell),
                                    *zip(*[(r, s, what, config, synthetic) for r, s in cells])))
    results: dict[float, dict[str, list[dict[str, float]]]] = {r: {} for r in config.ratios}
    for (ratio, _), by_method in zip(cells, outputs):
        for method, metrics in by_method.items():
            results[ratio].setdefault(method, []).append(metrics)
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
    results: dict[float, dict[str, list[dict[str, float]]]], metrics: tuple[str, ...] = ("unbiased", "worst_group"),
    pairs: tuple[tuple[str, str], ...] = PAIRS,
) -> str:
    """DDB minus its real-data-amplifier twin, per seed (runs are in seed order for every method), in points."""
    lines = []
    for ratio, by_method in results.items():
        for method, baseline in pairs:
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
    results: dict, *, command: str, elapsed_s: float, cpu_s: float, config: BenchmarkConfig, notes: str = "",
    title: str = "Debiasing on colored digits",
) -> str:
    seeds = ", ".join(map(str, config.seeds))
    pairs = PAIRS + tuple((m, "ddb-real-1") for by_method in results.values() for m in by_method
                          if m.startswith("ddb-1 "))
    return (
        f"# {title}\n\n"
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
        + format_paired_differences(results, pairs=pairs) + "\n" + (f"\n{notes}\n" if notes else "")
    )


def with_overrides(config: BenchmarkConfig, **overrides) -> BenchmarkConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
