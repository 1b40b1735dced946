"""`biasfast debias`: one method at one ratio over seeds, or the full table written to benchmarks/debias_table.md.

The table is a generated file of its own, so a rerun never overwrites the hand-written analysis in DEBIAS.md."""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from biasfast.data.colored_digits import check_ratio
from biasfast.debias.benchmark import (
    BASELINES,
    METHODS,
    BenchmarkConfig,
    format_table,
    method_name,
    run_ablation,
    run_benchmark,
    table_report,
    with_overrides,
)
from biasfast._core.io import write_text_atomic


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("debias", help="Diffusing DeBias and baselines on colored digits")
    p.add_argument("--ratio", type=float, default=0.99, help="bias-aligned ratio of the training set, in (0, 1)")
    p.add_argument("--recipe", type=int, choices=(1, 2), help="DDB recipe: 1 = pseudo-groups + GroupDRO, 2 = LfF-style")
    p.add_argument("--baseline", choices=BASELINES, help="a baseline instead of DDB (ddb-real takes --recipe)")
    p.add_argument("--table", action="store_true", help="every method at every ratio → --out")
    p.add_argument("--ablation", action="store_true",
                   help="DDB Recipe I at guidance scales 1, 2, 4 x 400 and 1000 synthetic images per class, beside "
                        "ddb-real-1, at --ratio (or --ratios) → --out")
    p.add_argument("--ratios", help="comma list of aligned ratios for --table/--ablation (default: all four for "
                                    "--table; --quick or --ablation: --ratio)")
    p.add_argument("--out", type=Path, default=None,
                   help="where --table / --ablation write (default benchmarks/debias_table.md / "
                        "debias_ablation.md: generated files; benchmarks/DEBIAS.md holds the analysis)")
    p.add_argument("--quick", action="store_true", help="CI-sized run (≤ 5 minutes)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale for the synthetic images (diffusers convention)")
    p.add_argument("--per-class", type=int, help="synthetic images per class (default 400; 100 with --quick)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/debias-synthetic"),
                   help="where the synthetic images of each (ratio, seed) are cached; '' disables")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one (ratio, seed) cell each at a time")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    p.set_defaults(func=main)


def _synthetic_source(args: argparse.Namespace, quick: bool):
    from biasfast.debias.synthetic import SyntheticConfig, DiffusionSource

    config = SyntheticConfig.quick() if quick else SyntheticConfig()
    config = config.with_overrides(guidance_scale=args.guidance_scale, per_class=args.per_class,
                                   progress=sys.stderr.isatty())
    return DiffusionSource(config, cache_dir=args.cache_dir if str(args.cache_dir) not in ("", ".") else None)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished workers."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise SystemExit(f"--threads: expected >= 1, got {args.threads}")
    if args.guidance_scale is not None and args.guidance_scale <= 0:
        raise SystemExit(f"--guidance-scale: must be > 0, got {args.guidance_scale}")
    torch.set_num_threads(args.threads)
    config = BenchmarkConfig.quick() if args.quick else BenchmarkConfig()
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds: expected >= 1, got {args.seeds}")
        config = with_overrides(config, seeds=tuple(range(args.seeds)))
    if args.table and args.ablation:
        raise SystemExit("--table and --ablation: give one of them")
    report_out = args.out or Path("benchmarks/debias_ablation.md" if args.ablation else "benchmarks/debias_table.md")
    try:
        if args.table or args.ablation:
            methods = METHODS
        else:
            config = with_overrides(config, ratios=(check_ratio(args.ratio),))
            methods = (method_name(args.recipe, args.baseline),)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if (args.table or args.ablation) and args.ratios is not None:
        try:
            config = with_overrides(config, ratios=tuple(check_ratio(float(r)) for r in args.ratios.split(",")))
        except ValueError as err:
            raise SystemExit(f"--ratios: expected a comma list of ratios in (0, 1), got {args.ratios!r} ({err})")
    elif args.ablation or args.table and args.quick:
        config = with_overrides(config, ratios=(check_ratio(args.ratio),))
    synthetic = _synthetic_source(args, args.quick) if any(m.startswith("ddb-") and "real" not in m
                                                            for m in methods) else None
    if args.jobs < 1:
        raise SystemExit(f"--jobs: expected >= 1, got {args.jobs}")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.ablation:
        results = run_ablation(config, synthetic, log=log, jobs=args.jobs)
    else:
        results = run_benchmark(methods, config, synthetic, log=log, jobs=args.jobs)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    print(format_table(results))
    print(f"{elapsed / 60:.1f} min wall, {cpu / 60:.1f} min CPU ({args.jobs} job(s))")
    if args.table or args.ablation:
        command = "biasfast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        title = "DDB guidance × synthetic set size ablation" if args.ablation else "Debiasing on colored digits"
        report = table_report(results, command=command, elapsed_s=elapsed, cpu_s=cpu, config=config,
                              notes=getattr(synthetic, "description", ""), title=title)
        write_text_atomic(report, report_out)
        print(f"wrote {report_out}")
    return 0
