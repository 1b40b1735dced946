"""`biasfast hierarchy <experiment>`: train (or reuse) the sample-split pair, run one experiment, write JSON + PNG.

The trained pair lives in `--models` (default OUT/models) and is reused by every experiment with the same pair
settings, so the first experiment pays for training and the others only evaluate. The default `--preset mechanism`
is the small grammar and training found by `benchmarks/hierarchy_sweep.py` (see benchmarks/HIERARCHY.md) on which
the first step of coarse-to-fine learning shows within minutes of one CPU core; `--preset staircase` trades
about 15 minutes of CPU for the descent to BP_1; `--preset paper-grammar` is the paper's grammar at CPU sizes;
`--paper-sizes` switches to the paper's grammar and sizes (n = 5000, 20k epochs, width 512, 8 layers, paper
evaluation sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from biasfast._core.checks import check_device
from biasfast.hierarchy.experiments import EXPERIMENTS, RUNNERS, EvalConfig
from biasfast.hierarchy.train import PairConfig, PairTrainer
from biasfast._core.io import write_atomically, write_json_atomic

PAPER_PAIR = dict(n_train=5000, epochs=20000, checkpoints=25, first_checkpoint=100, width=512, layers=8)
PAPER_EVAL = {"sequential": dict(n_eval=3000, reps=5), "nn-divergence": dict(n_eval=50000, sample_steps=0),
              "loss-decomposition": dict(n_eval=5000), "uturn": dict(n_eval=1000, reps=100)}
CPU_EVAL = {"sequential": {}, "nn-divergence": {}, "loss-decomposition": {}, "uturn": dict(n_eval=128, reps=2,
                                                                                        max_epochs=6)}
# (pair settings over PairConfig's defaults, evaluation settings per experiment); PairConfig's defaults are the
# paper's grammar q = 6, depth 4, sigma 1, q_eff = 4
PRESETS = {
    # 8 leaves over 4 symbols with 2 productions each: the one grammar of the sweep (benchmarks/HIERARCHY.md) on
    # which a width-32 network leaves the most factorised oracle and KL(A || B) dips before the test proxy within
    # 6000 full-batch steps (about 1.5 min of CPU)
    "mechanism": (dict(q=4, depth=3, q_eff=2, n_train=64, batch_size=64, width=32, layers=2, lr=3e-3, epochs=6000,
                       checkpoints=12, first_checkpoint=50), {name: {} for name in CPU_EVAL}),
    # the same 8 leaves at sigma = 0.1 with 256 sequences per block for 20000 epochs (about 15 min of CPU): the
    # nearest oracle reaches BP_1 through the whole coarse-to-fine staircase, and generated sequences come closer
    # to the training set than fresh data after the KL(A || B) minimum
    "staircase": (dict(q=4, depth=3, q_eff=2, sigma=0.1, n_train=256, batch_size=64, width=32, layers=2, lr=3e-3,
                       epochs=20000, checkpoints=18, first_checkpoint=50), {name: {} for name in CPU_EVAL}),
    "paper-grammar": ({}, CPU_EVAL),
}
PAIR_FLAGS = {"n_train": int, "epochs": int, "checkpoints": int, "first_checkpoint": int, "width": int, "layers": int,
              "batch_size": int, "lr": float, "q": int, "depth": int, "sigma": float, "q_eff": int, "data_seed": int}
EVAL_FLAGS = {"n_eval": int, "reps": int, "sample_steps": int, "max_epochs": int}
HELP = {"n_train": "sequences per training block (A: block 0, B: block 1)", "epochs": "training epochs per model",
        "checkpoints": "log-spaced checkpoints", "first_checkpoint": "epoch of the first checkpoint",
        "width": "transformer width", "layers": "transformer layers", "batch_size": "training batch size",
        "lr": "Adam learning rate", "q": "symbols", "depth": "tree depth (2^depth tokens)", "sigma": "grammar σ",
        "q_eff": "allowed productions per symbol", "data_seed": "seed of the grammar and the data",
        "n_eval": "evaluation sequences per set, or generated sequences (nn-divergence)",
        "reps": "noise draws per evaluation sequence (sequential, uturn)",
        "sample_steps": "posterior steps of the sampler from t = T (nn-divergence; 0: all T)",
        "max_epochs": "evaluate at most this many checkpoints, spread over the grid (0: all)"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("hierarchy", help="bias-mechanism experiments on the hierarchical data model")
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--out", default=os.path.join("runs", "hierarchy"), help="where <experiment>.json/.png go")
    p.add_argument("--models", default=None, help="folder of the trained pair, reused when present (default OUT/models)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="pair and evaluation settings the flags start from (default mechanism: a small grammar on "
                        "which the mechanism shows on a CPU in minutes; staircase: a flatter version with more data "
                        "and epochs whose network descends to BP_1, about 15 min of CPU; paper-grammar: the paper's "
                        "grammar at CPU sizes)")
    p.add_argument("--paper-sizes", action="store_true", help="the paper's grammar, training and evaluation sizes "
                   "(GPU-scale)")
    for name, kind in {**PAIR_FLAGS, **EVAL_FLAGS}.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=HELP[name])
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, training noise and evaluations")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these small networks run fastest single-threaded, "
                        "several times faster than 2 threads on a loaded 2-core machine)")
    p.add_argument("--device", default="cpu", help="where the transformers train and run: cpu or cuda (the data, "
                   "BP oracles and samplers' state stay on the CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def _configs(args: argparse.Namespace) -> tuple[PairConfig, EvalConfig]:
    if args.paper_sizes and args.preset is not None:
        raise ValueError(f"--preset: {args.preset!r} cannot be combined with --paper-sizes (which sets every size)")
    if args.paper_sizes:
        pair, evaluation = dict(PAPER_PAIR), dict(PAPER_EVAL[args.experiment])
    else:
        preset_pair, preset_eval = PRESETS[args.preset or "mechanism"]
        pair, evaluation = dict(preset_pair), dict(preset_eval[args.experiment])
    pair.update({k: getattr(args, k) for k in PAIR_FLAGS if getattr(args, k) is not None})
    evaluation.update({k: getattr(args, k) for k in EVAL_FLAGS if getattr(args, k) is not None})
    for name in EVAL_FLAGS:
        value = evaluation.get(name)
        if value is not None and (value < 0 or value == 0 and name not in ("sample_steps", "max_epochs")):
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    return PairConfig(**pair, seed=args.seed), EvalConfig(**evaluation, seed=args.seed)


def _summary(result: dict) -> str:
    phase = result["phase"]
    if result["experiment"] == "uturn":
        gaps = ", ".join(f"{e} {g:+.3f}" for e, g in zip(result["epochs"], phase["train_minus_test_gap"]))
        return (f"train − test overlap-ratio gap by epoch: {gaps}\n"
                f"largest at epoch {phase['largest_gap_epoch']}; separated (> 2 SE at every t) from epoch "
                f"{phase['separated_from']}; smallest at epoch {phase['gap_minimum_epoch']}, regrown beyond it "
                f"(> 2 SE at every t) from epoch {phase['regrowth_from']}")
    lines = [f"minima (epoch): " + ", ".join(f"{k} {v}" for k, v in phase["minima"].items()),
             "order of minima: " + " < ".join(" = ".join(names) + f" (epoch {epoch})" for epoch, names in phase["order"]),
             f"tau_bias (min {phase['bias_curve']}) = {phase['tau_bias']}, "
             f"tau_test (min {phase['test_curve']}) = {phase['tau_test']}"]
    window = phase["biased_window"]
    lines.append(f"biased phase: epochs {window[0]}..{window[1]}" if window else "biased phase: not seen " + (
        "(see the note)" if phase.get("note") else "(the bias signal does not reach its minimum before the test proxy)"))
    if phase.get("note"):
        lines.append(f"note: {phase['note']}")
    if phase["test_still_falling"]:
        lines.append(f"note: {phase['test_curve']} still falls at the last checkpoint, so tau_test is only an upper "
                     "end of this run (train longer to locate the test minimum)")
    if "nn_distance_gap" in result["curves"]:
        lines.append("mean NN distance, generated − fresh (< 0: closer to the training set): " + ", ".join(
            f"{e}: {g:+.2f}" for e, g in zip(result["epochs"], result["curves"]["nn_distance_gap"])))
    if "nearest_oracle_k" in phase:
        lines.append("nearest oracle BP_k per checkpoint: " + ", ".join(
            f"{e}: k={k}" for e, k in zip(result["epochs"], phase["nearest_oracle_k"])))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads: expected >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    pair, evaluation = _configs(args)
    device = check_device(args.device, "--device")
    models = args.models or os.path.join(args.out, "models")
    started = time.perf_counter()
    trainer = PairTrainer(pair, models, device)
    trained_now = not trainer.done()
    trainer.train(progress=not args.no_progress)
    trained = time.perf_counter()
    from biasfast.hierarchy.plots import plot  # matplotlib only when an experiment runs

    result = RUNNERS[args.experiment](trainer, evaluation, progress=not args.no_progress)
    result.update(pair=dataclasses.asdict(pair), evaluation=dataclasses.asdict(evaluation), models=models,
                  trained_now=trained_now, train_time_s=trained - started,
                  wall_time_s=time.perf_counter() - started)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.experiment)
    write_json_atomic(result, stem + ".json")
    png = plot(result)
    write_atomically(stem + ".png", lambda stream: stream.write(png), "wb")
    print(f"== hierarchy {args.experiment} ({'trained' if trained_now else 'reused'} the pair in {models})")
    print(_summary(result))
    print(f"wrote {stem}.json and {stem}.png; wall time {result['wall_time_s']:.1f} s "
          f"(training {result['train_time_s']:.1f} s)")
    return 0
