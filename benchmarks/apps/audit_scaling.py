"""`biasfast audit` costs: the share of time outside sampling and the kNN calls, and peak memory against the
training-set size (it streams, so it should not grow). A script, not a pytest-benchmark: one audit is one sample.

    python benchmarks/apps/audit_scaling.py --work /tmp/audit-bench --n 1000 --steps 50 --images 5000 50000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPE = (3, 32, 32)


def _tiny_unet(seed: int):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def _images(path: str, rows: int, seed: int) -> str:
    if not os.path.exists(path):
        array = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.uint8, shape=(rows, *SHAPE))
        rng = np.random.default_rng(seed)
        for start in range(0, rows, 5000):
            array[start : start + 5000] = rng.integers(0, 256, (min(5000, rows - start), *SHAPE), dtype=np.uint8)
        array.flush()
        del array
        os.replace(path + ".tmp.npy", path)
    return path


def time_split(work: str, n: int, steps: int, rows: int) -> dict:
    """One audit in this process, with the kNN calls timed: the shares of sampling, kNN and the rest."""
    from biasfast.apps import audit
    from biasfast.apps.main import main
    from biasfast.metrics import search

    for side, seed in (("a", 0), ("b", 1)):
        if not os.path.isdir(os.path.join(work, f"model_{side}")):
            _tiny_unet(seed).save_pretrained(os.path.join(work, f"model_{side}"))
    spent = {"knn_s": 0.0}

    def timed(inner):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent["knn_s"] += time.perf_counter() - started
        return call

    search.knn, audit.knn = timed(search.knn), timed(audit.knn)
    out = os.path.join(work, f"split_{n}_{steps}_{rows}_{time.time_ns()}")
    code = main(["audit", "--model-a", os.path.join(work, "model_a"), "--model-b", os.path.join(work, "model_b"),
                 "--train-a", _images(os.path.join(work, f"a_{rows}.npy"), rows, 0),
                 "--train-b", _images(os.path.join(work, f"b_{rows}.npy"), rows, 1), "--n", str(n), "--steps",
                 str(steps), "--out", out, "--no-progress"])
    assert code == 0
    with open(os.path.join(out, "report.json")) as stream:
        timings = json.load(stream)["timings"]
    rest = timings["total_s"] - timings["sampling_s"] - spent["knn_s"]
    return {**timings, **spent, "outside_sampling_and_knn_s": rest, "outside_share": rest / timings["total_s"]}


MEMORY_FIELDS = ("Rss", "Anonymous", "Private_Dirty", "Private_Clean", "Shared_Clean", "Pss_File")


def _smaps_rollup() -> dict:
    """This process's memory by kind, in KiB (Linux /proc/self/smaps_rollup)."""
    kinds = {}
    with open("/proc/self/smaps_rollup") as stream:
        for line in stream:
            name, value = line.split()[:2]
            if name.rstrip(":") in MEMORY_FIELDS:
                kinds[name.rstrip(":")] = int(value)
    return kinds


def _memory_child(arguments: list[str]) -> None:
    """Run one audit here while a thread polls smaps_rollup every 10 ms; print the peak of each kind.

    ru_maxrss counts the memmapped training files' pages once touched (file-backed and clean, reclaimable), so it
    grows with the data even when nothing is held; Anonymous / Private_Dirty are what the audit allocates."""
    import resource
    import threading

    from biasfast.apps.main import main as cli

    peaks = _smaps_rollup()
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.01):
            for name, value in _smaps_rollup().items():
                peaks[name] = max(peaks[name], value)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    code = cli(arguments)
    done.set()
    poller.join()
    for name, value in _smaps_rollup().items():
        peaks[name] = max(peaks[name], value)
    peaks["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAKS_KB", json.dumps(peaks))
    sys.exit(code)


def peak_memory(work: str, rows: int, n: int) -> dict:
    """Peak memory of an audit of given samples (no sampling) against two memory-mapped sets of `rows` images:
    ru_maxrss and, polled, the peaks of anonymous (allocated) and file-backed (page cache) memory."""
    samples = _images(os.path.join(work, f"samples_{n}.npy"), n, 7)
    train_a = _images(os.path.join(work, f"a_{rows}.npy"), rows, 0)
    train_b = _images(os.path.join(work, f"b_{rows}.npy"), rows, 1)
    out = os.path.join(work, f"memory_{rows}_{time.time_ns()}")
    arguments = ["audit", "--samples-a", samples, "--samples-b", samples, "--train-a", train_a, "--train-b", train_b,
                 "--out", out, "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(arguments)],
                            capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAKS_KB"))
    peaks = json.loads(line.split(maxsplit=1)[1])
    return {"rows": rows, **{f"peak_{name}_mib": value / 1024 for name, value in peaks.items()},
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--skip-split", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        return _memory_child(json.loads(args.memory_child))
    if args.work is None:
        parser.error("--work: required (a folder for the models, images and audit outputs)")
    os.makedirs(args.work, exist_ok=True)
    if not args.skip_split:
        print(json.dumps({"time_split": time_split(args.work, args.n, args.steps, args.images[0])}), flush=True)
    for rows in args.images:
        print(json.dumps({"memory": peak_memory(args.work, rows, args.n)}), flush=True)


if __name__ == "__main__":
    main()
