"""Sweep of the hierarchical-model pair over what sets its time scales, reading off which bias signs appear.

Each configuration (`name:key=value,...`, keys of `PairConfig` plus `t_fraction` of the evaluation) trains the
sample-split pair in OUT/<name>/models (resumable: rerun the same command after a kill), records the training's
wall and CPU time (user + sys of this process; training is single-threaded), runs the chosen experiments and writes
OUT/<name>/summary.json atomically; a configuration whose summary exists runs only the experiments it lacks (the
others are read back from their JSON), so adding one to a finished configuration costs only its evaluation.
`--table` prints the markdown table of every summary under OUT.

    nice -n 10 python benchmarks/hierarchy_sweep.py --out runs/sweep \\
        small:q=4,depth=3,q_eff=3,n_train=256,epochs=3000,batch_size=64,lr=1e-3 --experiments sequential
    python benchmarks/hierarchy_sweep.py --out runs/sweep --table

The signs (as `biasfast hierarchy` reads them):
- coarse→fine: `sequential`'s nearest oracle BP_k starts at k ≥ depth − 1 and ends at k ≤ 1;
- window: `sequential`'s KL(A ‖ B) on test inputs has its minimum before KL(BP_0 ‖ A)'s (`biased_window`);
- nn: after `sequential`'s KL(A ‖ B) minimum (τ_bias; the NN-divergence minimum when `sequential` is not run),
  generated sequences sit closer to A's training set than fresh data, by more than 2 standard errors
  (`nn_distance_gap` + 2·SE < 0);
- excess: `loss-decomposition`'s training ℓ̃ is below zero by 2 SE from some checkpoint on (onset epoch);
- uturn: U-turns from training starts return closer to their start than from test starts, by 2 SE at every t;
  and the regrowth: the train − test gap grows beyond its minimum by 2 SE at every t (after the copy-free test
  set's early offset, this is the reading).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import resource
import sys
import time

import torch

from biasfast._core.io import write_json_atomic
from biasfast.hierarchy.experiments import EXPERIMENTS, RUNNERS, EvalConfig
from biasfast.hierarchy.train import PairConfig, PairTrainer

EVAL_KEYS = {"t_fraction": float, "n_eval": int, "reps": int, "sample_steps": int, "max_epochs": int}
PAIR_KEYS = {f.name: f.type for f in dataclasses.fields(PairConfig)}


def parse_config(text: str) -> tuple[str, dict, dict]:
    """`name:key=value,...` → (name, PairConfig kwargs, EvalConfig kwargs)."""
    name, _, body = text.partition(":")
    if not name or "/" in name:
        raise ValueError(f"config: expected name:key=value,..., got {text!r}")
    pair, evaluation = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key in EVAL_KEYS:
            evaluation[key] = EVAL_KEYS[key](value)
        elif key in PAIR_KEYS:
            pair[key] = float(value) if PAIR_KEYS[key] == "float" else int(value)
        else:
            raise ValueError(f"config {name!r}: unknown key {key!r} (known: {', '.join([*PAIR_KEYS, *EVAL_KEYS])})")
    return name, pair, evaluation


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def signs(results: dict, depth: int) -> dict:
    """Which of the mechanism's signs each experiment's result shows, with the numbers behind them."""
    out: dict = {}
    if "sequential" in results:
        r = results["sequential"]
        phase, curves = r["phase"], r["curves"]
        ks = phase["nearest_oracle_k"]
        kl_ab = curves["test/KL(A||B)"]["mean"]
        out["sequential"] = {
            "nearest_oracle_k": ks, "coarse_to_fine": ks[0] >= depth - 1 and ks[-1] <= 1,
            "biased_window": phase["biased_window"], "tau_bias": phase["tau_bias"], "tau_test": phase["tau_test"],
            "test_still_falling": phase["test_still_falling"],
            "kl_ab_min": min(kl_ab), "kl_ab_last": kl_ab[-1],
            "kl_bp0_a_min": min(curves["test/KL(BP_0||A)"]["mean"]),
            "kl_bp0_a_last": curves["test/KL(BP_0||A)"]["mean"][-1],
            "kl_ab_train_minus_test_last": curves["train/KL(A||B)"]["mean"][-1] - kl_ab[-1]}
    if "nn-divergence" in results:
        r = results["nn-divergence"]
        c, epochs = r["curves"], r["epochs"]
        own = r["phase"]["tau_bias"]
        start = (results["sequential"]["phase"]["tau_bias"] if "sequential" in results else own) or epochs[0]
        closer = [e for e, g, s in zip(epochs, c["nn_distance_gap"], c["nn_distance_gap_se"]) if e > start and
                  g + 2 * s < 0]
        out["nn-divergence"] = {"biased_window": r["phase"]["biased_window"], "tau_bias": own, "after": start,
                                "closer_than_fresh_2se_at": closer, "gap": c["nn_distance_gap"],
                                "copy_fraction": c["copy_fraction"], "fresh_copy_fraction": r["fresh_copy_fraction"]}
    if "loss-decomposition" in results:
        p = results["loss-decomposition"]["phase"]
        out["loss-decomposition"] = {"excess_negative_from": p["train_excess_negative_from"],
                                     "biased_window": p["biased_window"]}
    if "uturn" in results:
        p = results["uturn"]["phase"]
        out["uturn"] = {"separated_from": p["separated_from"], "largest_gap_epoch": p["largest_gap_epoch"],
                        "largest_gap": max(p["train_minus_test_gap"]),
                        "gap_minimum_epoch": p.get("gap_minimum_epoch"), "regrowth_from": p.get("regrowth_from")}
    return out


def run_config(text: str, out: str, experiments: list[str], progress: bool) -> dict:
    name, pair_kwargs, eval_kwargs = parse_config(text)
    folder = os.path.join(out, name)
    summary_path = os.path.join(folder, "summary.json")
    results, eval_time = {}, {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if set(experiments) <= set(summary["results"]):
            return summary
        for experiment in summary["results"]:
            with open(os.path.join(folder, f"{experiment}.json")) as f:
                results[experiment] = json.load(f)
            eval_time[experiment] = summary["eval_time"][experiment]
    pair = PairConfig(**pair_kwargs)
    trainer = PairTrainer(pair, os.path.join(folder, "models"))
    wall, cpu = time.perf_counter(), cpu_seconds()
    trained_now = not trainer.done()
    trainer.train(progress=progress)
    train_wall, train_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    timing_path = os.path.join(folder, "train_time.json")
    if trained_now or not os.path.isfile(timing_path):  # a resumed run adds up its pieces; reuse keeps the first
        previous = {"wall_s": 0.0, "cpu_s": 0.0}
        if trained_now and os.path.isfile(timing_path):
            with open(timing_path) as f:
                previous = json.load(f)
        write_json_atomic({"wall_s": previous["wall_s"] + train_wall, "cpu_s": previous["cpu_s"] + train_cpu},
                          timing_path)
    with open(timing_path) as f:
        timing = json.load(f)
    for experiment in [e for e in experiments if e not in results]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        results[experiment] = RUNNERS[experiment](trainer, EvalConfig(**eval_kwargs), progress=progress)
        eval_time[experiment] = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu}
        write_json_atomic(results[experiment], os.path.join(folder, f"{experiment}.json"))
    summary = {"name": name, "config": text, "pair": dataclasses.asdict(pair), "evaluation": eval_kwargs,
               "train": timing, "eval_time": eval_time, "results": list(results),
               "signs": signs(results, pair.depth), "machine": f"{os.cpu_count()} cores, load "
               f"{os.getloadavg()[0]:.1f}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json_atomic(summary, summary_path)
    return summary


def _cell(value) -> str:
    return "–" if value is None else str(value)


def table(out: str) -> str:
    """Markdown table of every summary under `out`, in the order they were written."""
    rows = ["| config | train wall / CPU (s) | nearest BP_k per checkpoint | coarse→fine | KL(A‖B) min → last | "
            "KL(BP0‖A) min → last | window (τ_bias, τ_test) | nn closer (2 SE) | ℓ̃<0 from | U-turn sep. from | "
            "U-turn regrowth (2 SE) from |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    summaries = []
    for path in glob.glob(os.path.join(out, "*", "summary.json")):
        with open(path) as f:
            summaries.append(json.load(f))
    for s in sorted(summaries, key=lambda s: s["date"]):
        g = s["signs"]
        seq = g.get("sequential", {})
        nn = g.get("nn-divergence")
        rows.append(" | ".join([
            f"| `{s['config']}`", f"{s['train']['wall_s']:.0f} / {s['train']['cpu_s']:.0f}",
            "".join(map(str, seq.get("nearest_oracle_k", []))), _cell(seq.get("coarse_to_fine")),
            f"{seq['kl_ab_min']:.3g} → {seq['kl_ab_last']:.3g}" if seq else "–",
            f"{seq['kl_bp0_a_min']:.3g} → {seq['kl_bp0_a_last']:.3g}" if seq else "–",
            _cell(seq.get("biased_window")) + (" (test still falling)" if seq.get("test_still_falling") else ""),
            "–" if nn is None else (", ".join(map(str, nn["closer_than_fresh_2se_at"])) or "no"),
            _cell(g.get("loss-decomposition", {}).get("excess_negative_from")),
            _cell(g.get("uturn", {}).get("separated_from")), _cell(g.get("uturn", {}).get("regrowth_from"))]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", help="name:key=value,... (PairConfig keys, t_fraction, n_eval, ...)")
    parser.add_argument("--out", default=os.path.join("runs", "hierarchy-sweep"))
    parser.add_argument("--experiments", default="sequential",
                        help=f"comma-separated, of {', '.join(EXPERIMENTS)} (default sequential)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of OUT and exit")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    experiments = [e for e in args.experiments.split(",") if e]
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"--experiments: unknown {unknown}; choose from {EXPERIMENTS}")
    torch.set_num_threads(1)
    for text in args.configs:
        summary = run_config(text, args.out, experiments, progress=not args.no_progress)
        print(json.dumps({"name": summary["name"], "train": summary["train"], "signs": summary["signs"]}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
