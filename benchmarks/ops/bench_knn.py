"""Exact kNN: biasfast vs torch.cdist + topk (chunked), its torch.compile, and faiss-cpu IndexFlatL2 (optional).

`test_knn_paired_with_faiss` times the providers in rotating order and reports the median of the per-round ratios:
this machine's speed drifts by up to 2× between runs, which a ratio of two separately timed groups does not survive.

Also a peak-memory check: streaming nr = 10^6 references (d = 16) past 1000 queries must grow the process's
peak RSS by at most the workspace plus O(nq·k) (plus one streamed chunk and allocator slack).
"""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import biasfast
from benchmarks.conftest import QUICK, rotating_rounds, shapes

try:
    import faiss
except ImportError:  # a benchmark-only optional dependency
    faiss = None

SHAPES = shapes(full=[(2000, 50000, 64), (2000, 20000, 3072), (10000, 10000, 784)], quick=[(50, 301, 16)])
PROVIDERS = ["biasfast", "reference", "compiled", "faiss"]
ROUNDS = 3


def cdist_topk(query: torch.Tensor, ref: torch.Tensor, k: int, chunk: int = 512):
    """The plain-PyTorch baseline, in query chunks so the distance matrix stays bounded."""
    parts = [torch.cdist(query[i : i + chunk], ref).topk(k, dim=1, largest=False) for i in range(0, len(query), chunk)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def faiss_search(query: torch.Tensor, ref: torch.Tensor, k: int):
    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref.numpy())
    return lambda: index.search(query.numpy(), k)


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("nq,nr,d", SHAPES)
def test_knn(bench, benchmark, provider, nq, nr, d, k):
    if provider == "faiss" and faiss is None:
        pytest.skip("faiss-cpu is not installed")
    benchmark.group = f"knn {nq}x{nr}x{d} k={k}"
    gen = torch.Generator().manual_seed(0)
    query, ref = torch.randn(nq, d, generator=gen), torch.randn(nr, d, generator=gen)
    fn = {
        "biasfast": lambda: lambda: biasfast.knn(query, ref, k=k),
        "reference": lambda: lambda: cdist_topk(query, ref, k),
        "compiled": lambda: (lambda f: lambda: f(query, ref, k))(torch.compile(cdist_topk)),
        "faiss": lambda: faiss_search(query, ref, k),
    }[provider]()
    bench(fn, provider=provider, shape=f"{nq}x{nr}x{d} k={k}", rounds=ROUNDS, warmup=1)


PAIRS = 2 if QUICK else 7


def paired_with_faiss(benchmark, label: str, query: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """biasfast, faiss and (d ≤ 128) cdist+topk in rotating order (rotating_rounds); ratios per round, vs biasfast."""
    if faiss is None:
        pytest.skip("faiss-cpu is not installed")
    benchmark.group = f"knn paired with faiss {label}"
    calls = {"biasfast": lambda: biasfast.knn(query, ref, k=k), "faiss": faiss_search(query, ref, k)}
    if query.shape[1] <= 128:
        calls["reference"] = lambda: cdist_topk(query, ref, k)
    for call in calls.values():
        call()  # warm-up
    times, _ = rotating_rounds(benchmark, calls, PAIRS)
    summary = {"rounds": PAIRS, "biasfast_min_s": min(times["biasfast"])}
    lines = []
    for name in list(calls)[1:]:
        ratios = [t / b for t, b in zip(times[name], times["biasfast"])]
        summary[f"median_ratio_vs_{name}"] = statistics.median(ratios)
        lines.append(f"{name}/biasfast per round {', '.join(f'{r:.2f}' for r in ratios)}; median "
                     f"{statistics.median(ratios):.2f}; min {min(times[name]):.3f} s")
    benchmark.extra_info.update(shape=label, **summary)
    print(f"\n{label} (biasfast min {summary['biasfast_min_s']:.3f} s): " + " | ".join(lines))


@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("nq,nr,d", SHAPES)
def test_knn_paired_with_faiss(benchmark, nq, nr, d, k):
    gen = torch.Generator().manual_seed(0)
    query, ref = torch.randn(nq, d, generator=gen), torch.randn(nr, d, generator=gen)
    paired_with_faiss(benchmark, f"{nq}x{nr}x{d} k={k}", query, ref, k)


@pytest.mark.parametrize("copies", [6, 24])
@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("nq,nr,d", shapes(full=[(2000, 50000, 64)], quick=[(50, 301, 16)]))
def test_knn_duplicated_references_paired_with_faiss(benchmark, nq, nr, d, k, copies):
    """Memorization data: every reference `copies` times, each query near one of them. Tie groups larger than the
    first pass's extra candidates are rechecked with wider heaps (knn.cpp), not brute-forced."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(nr // copies, d, generator=gen)
    ref = base.repeat(copies, 1)
    query = base[torch.randint(0, len(base), (nq,), generator=gen)] + 1e-3 * torch.randn(nq, d, generator=gen)
    paired_with_faiss(benchmark, f"{nq}x{len(ref)}x{d} k={k} copies={copies}", query, ref, k)


MEMORY_SCRIPT = r"""
import json, sys, torch, biasfast
nq, nr, d, k, chunk, workspace_mb = (int(a) for a in sys.argv[1:])
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
query = torch.randn(nq, d)
biasfast.knn(query, torch.randn(100, d), k=k)  # load everything once
def chunks():
    for start in range(0, nr, chunk):
        yield torch.randn(min(chunk, nr - start), d, generator=torch.Generator().manual_seed(start))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
dist, index = biasfast.knn(query, chunks(), k=k, workspace_mb=workspace_mb)
print(json.dumps({"growth_mb": status("VmHWM") - before, "max_index": int(index.max())}))
"""


def test_knn_peak_memory():
    nq, nr, d, k, chunk, workspace_mb = 1000, 100_000 if QUICK else 1_000_000, 16, 10, 50_000, 16
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *map(str, (nq, nr, d, k, chunk, workspace_mb))],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    chunk_mb = chunk * d * 4 / 2**20
    allowed = workspace_mb + 2 * chunk_mb + 8  # workspace + two live chunks + O(nq·k) and allocator slack
    print(f"peak RSS growth {result['growth_mb']:.1f} MB for nr={nr}, allowed {allowed:.1f} MB")
    assert result["max_index"] > nr - chunk
    assert result["growth_mb"] <= allowed
