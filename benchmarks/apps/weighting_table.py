"""The WEIGHTING.md table: several `biasfast run` comparisons (one per loss or ablation) side by side, FID per
sampling budget as mean ± std over seeds, and differences paired by seed between chosen arms.

    python benchmarks/apps/weighting_table.py \
        "mse constant=/tmp/wcmp/mse:constant" "mse debias=/tmp/wcmp/mse:debias" \
        "hybrid constant=/tmp/wcmp/hybrid:constant" "hybrid debias=/tmp/wcmp/hybrid:debias" \
        --pair "mse debias-mse constant" --pair "hybrid debias-hybrid constant" --fixed-ddpm

An arm is `label=<comparison folder>:<weighting>`. `--fixed-ddpm` adds, for learned-variance (hybrid) runs, the
full DDPM chain sampled with the fixed variance β̃ from the same models' prediction channels (the learned vs
fixed variance ablation); each run's score is cached beside its samples, so a rerun only prints.
`--change "A-B=>C-D"` prints, per budget, the paired gaps A − B and C − D seed by seed, the change of the gap
(C − D) − (A − B) per seed, its mean ± std (standard error), and whether it is beyond twice its standard error
with one sign on every seed (the reading bar of WEIGHTING.md's ablations).
"""

from __future__ import annotations

import argparse
import json
import os

from biasfast._core.io import write_json_atomic
from biasfast.apps.compare import seed_classifier
from biasfast.apps.main import PLAN_FILE
from biasfast.apps.run import SAMPLE_DIR, Experiment, RunConfig
from biasfast.data import load_images, split_disjoint
from biasfast.diffusion.sampling import sample_coupled
from biasfast.metrics.quality import classifier_fid
from biasfast.metrics.stats import mean_se, mean_std

FIXED = "ddpm fixed β̃"


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _arm(text: str) -> tuple[str, str, str]:
    label, _, where = text.partition("=")
    folder, _, weighting = where.rpartition(":")
    if not label or not folder or not weighting:
        raise SystemExit(f"arm: expected 'label=<folder>:<weighting>', got {text!r}")
    return label, folder, weighting


def fixed_variance_fid(folder: str, weighting: str, seed: int) -> float:
    """FID of a hybrid run's final models on the full DDPM chain with the fixed posterior variance (cached)."""
    run_dir = os.path.join(folder, weighting, f"seed_{seed}")
    config = RunConfig.from_dict(_read_json(os.path.join(run_dir, "config.json")))
    experiment = Experiment(config, run_dir, progress=False)
    step = experiment.schedule_steps[-1]
    cache = os.path.join(run_dir, SAMPLE_DIR, f"fixed_ddpm_step_{step:08d}.json")
    if os.path.isfile(cache):
        return _read_json(cache)["fid"]
    channels = experiment.image_shape[0]
    models = [lambda x, t, m=m: m(x, t)[:, :channels] for m in experiment.final_models()]
    samples = sample_coupled(models, config.n_samples, experiment.image_shape, experiment.schedule, seed=seed,
                             method="ddpm", variance="fixed_small", progress=False)
    split = split_disjoint(load_images(config.data, image_size=config.image_size, channels=config.channels),
                           config.n_train, config.n_test, seed=seed)
    classifier = seed_classifier(split, folder, seed)
    fid = sum(classifier_fid(classifier, s.cpu(), split.test) for s in samples) / len(samples)
    write_json_atomic({"fid": fid}, cache)
    return fid


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def _split_pair(text: str, labels: list[str]) -> tuple[str, str]:
    """'A-B' into two arm labels; labels may hold '-' themselves (e.g. "mnist-ema constant")."""
    for i, char in enumerate(text):
        if char == "-" and text[:i] in labels and text[i + 1:] in labels:
            return text[:i], text[i + 1:]
    raise SystemExit(f"--pair: {text!r} is not 'label A-label B' for two of the arms {labels}")


def _gap(per_seed: dict[str, dict[str, dict]], pair: tuple[str, str], budget: str) -> dict[str, float]:
    a, b = pair
    return {s: per_seed[a][s][budget] - per_seed[b][s][budget] for s in sorted(set(per_seed[a]) & set(per_seed[b]))
            if budget in per_seed[a][s] and budget in per_seed[b][s]}


def _signed(values) -> str:
    return ", ".join(f"{v:+.1f}" for v in values)


def change_table(per_seed: dict[str, dict[str, dict]], budgets: list[str], before: tuple[str, str],
                 after: tuple[str, str]) -> list[str]:
    """Markdown rows: how the paired gap `after` differs from the gap `before`, seed by seed."""
    rows = [f"| sampler | {before[0]} − {before[1]}, per seed | {after[0]} − {after[1]}, per seed | change, per seed "
            "| change, mean ± std (SE) | beyond 2 SE, one sign? |", "|---" * 6 + "|"]
    for budget in budgets:
        first, second = _gap(per_seed, before, budget), _gap(per_seed, after, budget)
        seeds = sorted(set(first) & set(second))
        if len(seeds) < 2:
            continue
        change = [second[s] - first[s] for s in seeds]
        (mean, std), (_, se) = mean_std(change), mean_se(change)
        one_sign = all(c > 0 for c in change) or all(c < 0 for c in change)
        rows.append(f"| {budget} | {_signed(first[s] for s in seeds)} | {_signed(second[s] for s in seeds)} | "
                    f"{_signed(change)} | {mean:+.1f} ± {std:.1f} ({se:.1f}) | "
                    f"{'yes' if one_sign and abs(mean) > 2 * se else 'no'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="+", help="label=<comparison folder>:<weighting>")
    parser.add_argument("--pair", action="append", default=[], help="'label A-label B': A − B paired by seed")
    parser.add_argument("--fixed-ddpm", action="store_true", help="also the fixed-variance DDPM of hybrid runs")
    parser.add_argument("--change", action="append", default=[],
                        help="'A-B=>C-D': the change of the paired gap from A − B to C − D, seed by seed")
    args = parser.parse_args()
    per_seed: dict[str, dict[str, dict]] = {}
    budgets: dict[str, None] = {}  # ordered set
    for label, folder, weighting in map(_arm, args.arms):
        rows = _read_json(os.path.join(folder, "comparison.json"))[weighting]["per_seed"]
        hybrid = RunConfig(**_read_json(os.path.join(folder, PLAN_FILE))["base"]).loss == "hybrid"
        for seed, row in rows.items():
            row = {"final (DDIM η=1, 50)": row["fid"], **{k[4:]: v for k, v in row.items() if k.startswith("fid@")}}
            if args.fixed_ddpm and hybrid:
                row[FIXED] = fixed_variance_fid(folder, weighting, int(seed))
            rows[seed] = row
        per_seed[label] = rows
        budgets.update(dict.fromkeys(b for row in rows.values() for b in row))
    labels = list(per_seed)
    print("| sampler | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for budget in budgets:
        cells = [_cell([r[budget] for r in per_seed[label].values()]) if all(
            budget in r for r in per_seed[label].values()) else "–" for label in labels]
        print(f"| {budget} | " + " | ".join(cells) + " |")
    if args.pair:
        pairs = [_split_pair(pair, labels) for pair in args.pair]
        print("\n| sampler | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |")
        print("|---" * (len(pairs) + 1) + "|")
        for budget in budgets:
            cells = []
            for a, b in pairs:
                seeds = sorted(set(per_seed[a]) & set(per_seed[b]))
                diffs = [per_seed[a][s][budget] - per_seed[b][s][budget] for s in seeds
                         if budget in per_seed[a][s] and budget in per_seed[b][s]]
                cells.append(_cell(diffs) + f" ({sum(d > 0 for d in diffs)}/{len(diffs)} > 0)" if diffs else "–")
            print(f"| {budget} | " + " | ".join(cells) + " |")
    for text in args.change:
        before, arrow, after = text.partition("=>")
        if not arrow:
            raise SystemExit(f"--change: {text!r} is not 'A-B=>C-D'")
        print("\n" + "\n".join(change_table(per_seed, list(budgets), _split_pair(before, labels),
                                              _split_pair(after, labels))))


if __name__ == "__main__":
    main()
