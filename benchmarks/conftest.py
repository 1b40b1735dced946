"""Benchmark harness: machine info in the JSON, quick mode, and providers shared by every suite.

Run:   pytest benchmarks --benchmark-group-by=group --benchmark-json=out.json
Quick: BIASFAST_BENCH_QUICK=1 pytest benchmarks --benchmark-disable   (each case once, small shapes; CI uses it)
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import pytest
import torch

QUICK = os.environ.get("BIASFAST_BENCH_QUICK", "0") == "1"


def pytest_benchmark_update_machine_info(config, machine_info):
    from biasfast._core import buildinfo

    c = buildinfo.collect()
    machine_info["biasfast"] = {k: c[k] for k in ("cpu", "cores", "torch", "triton", "gpu", "build", "torch_threads")}


def shapes(full: list, quick: list) -> list:
    """The full sweep, or a small one in quick mode."""
    return quick if QUICK else full


def synchronized(fn: Callable) -> Callable:
    """pytest-benchmark does not wait for CUDA work: synchronise after each call on a GPU."""
    if not torch.cuda.is_available():
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def bench(benchmark):
    """benchmark.pedantic with warm-up, tagged with provider and shape for RESULTS.md tables."""

    def run(fn: Callable, *, provider: str, shape: str, rounds: int = 10, warmup: int = 2):
        benchmark.extra_info.update(provider=provider, shape=shape)
        fn = synchronized(fn)
        return benchmark.pedantic(fn, rounds=1 if QUICK else rounds, warmup_rounds=0 if QUICK else warmup)

    return run


def rotating_rounds(benchmark, calls: dict[str, Callable[[], Any]], rounds: int):
    """One call per provider per round, the order rotated every round, so this machine's drift (up to 2× between
    runs) hits every provider alike; compare providers by their per-round ratios. Returns each provider's times
    and outputs, in round order."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {name: [] for name in names}

    def run():
        for round_ in range(rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                outputs[name].append(calls[name]())
                times[name].append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=1, iterations=1)
    return times, outputs
