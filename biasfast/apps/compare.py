"""Sample quality of loss weightings at equal iterations, with the spread over seeds.

The weighting comparison of the main job (`biasfast run --weighting constant,debias --seeds 0,1,2`): every
(weighting, seed) run trains its models A and B for the same number of steps; the final samples of each model are
scored against the held-out test set by the sliced Wasserstein distance in pixel space and by the FID in the
feature space of a small digit classifier trained on that seed's training split. A seed fixes the split, the
shared initial weights and all noise, so runs of two weightings with one seed differ only by the weighting: the
paired differences per seed are the sharpest comparison, the spread over seeds says how much a single run can be
trusted.

The final models are also re-sampled at the sampling budgets of the Unmasking Bias comparison (DDIM with η = 0 at
10, 20 and 50 steps, DPM-Solver++(2M) at 10 and 20, the full DDPM chain), from the same keyed noise for both
weightings, so each budget's FID and SWD get their own mean ± std and paired differences.
"""

from __future__ import annotations

import json
import os

import torch

from biasfast._core.io import load_checkpoint, write_json_atomic
from biasfast.apps.run import SAMPLE_DIR, Experiment, RunConfig
from biasfast.data import DisjointSplit, load_images, split_disjoint
from biasfast.diffusion.sampling import LOOP_METHODS, sample_coupled
from biasfast.metrics.quality import classifier_fid, feature_classifier, sliced_wasserstein
from biasfast.metrics.stats import mean_std


def _mean_std(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


SAMPLING_BUDGETS = "ddim10,ddim20,ddim50,dpmsolver++10,dpmsolver++20,ddpm"  # the paper's figure; ddpm: full chain
QUICK_BUDGETS = "ddim10,dpmsolver++10,ddpm20"  # --quick: one of each sampler in about a second per run
MAIN_FIELDS = ("swd", "fid", "test_loss", "bias_score")


def parse_budgets(text: str) -> list[tuple[str, str, int | None]]:
    """"ddim10,dpmsolver++20,ddpm" → [(name, method, steps)], steps None for the full chain."""
    budgets = []
    for item in (part.strip() for part in text.split(",")):
        method = next((m for m in sorted(LOOP_METHODS, key=len, reverse=True) if item.startswith(m)), None)
        digits = item[len(method):] if method else ""
        if method is None or (digits and not digits.isdigit()) or digits.startswith("0") or (
                not digits and method != "ddpm"):
            raise ValueError(f"budgets: cannot read {item!r}; expected <method><steps> (methods {LOOP_METHODS}), "
                             "or 'ddpm' for the full chain, e.g. 'ddim10,dpmsolver++20,ddpm'")
        budgets.append((item, method, int(digits) if digits else None))
    return budgets


def budget_steps(name: str, num_timesteps: int) -> int:
    return parse_budgets(name)[0][2] or num_timesteps


def _quality(samples_a: torch.Tensor, samples_b: torch.Tensor, test: torch.Tensor,
             classifier: torch.nn.Module | None, suffix: str = "") -> dict:
    """SWD (and FID with a classifier) of models A and B's samples to `test`, and their mean."""
    swd = [sliced_wasserstein(s, test) for s in (samples_a, samples_b)]
    row = {f"swd_a{suffix}": swd[0], f"swd_b{suffix}": swd[1], f"swd{suffix}": sum(swd) / 2}
    if classifier is not None:
        fid = [classifier_fid(classifier, s, test) for s in (samples_a, samples_b)]
        row.update({f"fid_a{suffix}": fid[0], f"fid_b{suffix}": fid[1], f"fid{suffix}": sum(fid) / 2})
    return row


def budget_quality(run_dir: str, result: dict, test: torch.Tensor, classifier: torch.nn.Module | None,
                   budgets: str) -> dict:
    """The final models of one run re-sampled at each budget (keyed noise, seed of the run), scored like the final
    samples: fields "fid@<budget>", "swd@<budget>". Each budget's scores are kept beside the run's samples as soon
    as they exist (removed with them by --overwrite), so an interrupted comparison resumes without sampling a
    budget twice."""
    step = result["checkpoints"][-1]["step"]
    cache = os.path.join(run_dir, SAMPLE_DIR, f"budgets_step_{step:08d}.json")
    done = {}
    if os.path.isfile(cache):
        with open(cache) as f:
            done = json.load(f)
    config = RunConfig.from_dict(result["config"])
    experiment = models = None
    names = []
    for name, method, steps in parse_budgets(budgets):
        names.append(name)
        if name not in done:
            if models is None:
                experiment = Experiment(config, run_dir, progress=False)
                models = experiment.final_models()
            samples = sample_coupled(models, config.n_samples, experiment.image_shape, experiment.schedule,
                                     seed=config.seed, method=method, steps=steps, variance=config.variance,
                                     progress=False)
            done[name] = _quality(*(s.detach().cpu() for s in samples), test, classifier, "@" + name)
            write_json_atomic(done, cache)
    return {key: value for name in names for key, value in done[name].items()}


def run_quality(run_dir: str, result: dict, test: torch.Tensor, classifier: torch.nn.Module | None,
                budgets: str = SAMPLING_BUDGETS) -> dict:
    """One run's final checkpoint: SWD (and FID) of models A and B to `test`, their test loss and bias score, and
    the same quality at every sampling budget (`budget_quality`)."""
    step = result["checkpoints"][-1]["step"]
    samples = load_checkpoint(os.path.join(run_dir, SAMPLE_DIR, f"step_{step:08d}.pt"))
    row = {"step": step, "test_loss": result["checkpoints"][-1]["test_loss"], "bias_score": result["final"]["score"]}
    row.update(_quality(samples["samples_a"], samples["samples_b"], test, classifier))
    row.update(budget_quality(run_dir, result, test, classifier, budgets))
    return row


def _fields(rows: dict) -> tuple[str, ...]:
    """The main fields, then every budget's FID and SWD (as the runs hold them)."""
    first = next(iter(rows.values()))
    return MAIN_FIELDS + tuple(k for k in first if k.startswith(("fid@", "swd@")))


def summarize(per_run: dict[str, dict[int, dict]]) -> dict:
    """Per weighting: each field's mean ± std over seeds, and (from the second weighting on) the paired
    difference to the first weighting over the seeds both ran."""
    table, names = {}, list(per_run)
    quality_fields = _fields(per_run[names[0]])
    for name in names:
        rows = per_run[name]
        entry = {"seeds": sorted(rows), "per_seed": {str(s): rows[s] for s in sorted(rows)},
                 "step": next(iter(rows.values()))["step"]}
        for field in quality_fields:
            values = [row[field] for row in rows.values() if field in row]
            if values:
                entry[field] = _mean_std(values)
        if name != names[0]:
            base = per_run[names[0]]
            shared = sorted(set(rows) & set(base))
            entry["minus_" + names[0]] = {
                field: _mean_std([rows[s][field] - base[s][field] for s in shared])
                for field in quality_fields if shared and all(field in rows[s] and field in base[s] for s in shared)}
        table[name] = entry
    return table


def _cell(stat: dict | None, width: int) -> str:
    if stat is None:
        return f"{'-':>{width}}"
    text = f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")
    return f"{text:>{width}}"


def comparison_table(table: dict) -> str:
    """The summary as text: mean ± std over seeds, then the paired differences to the first weighting."""
    lines = [f"{'weighting':>12} {'seeds':>5} {'step':>6} {'SWD':>18} {'FID':>18} {'test loss':>18} {'score':>18}"]
    for name, entry in table.items():
        lines.append(f"{name:>12} {len(entry['seeds']):>5} {entry['step']:>6} "
                     + " ".join(_cell(entry.get(f), 18) for f in MAIN_FIELDS))
    for name, entry in table.items():
        for key, diffs in entry.items():
            if key.startswith("minus_"):
                lines.append(f"{name + ' − ' + key[6:]:>25} (paired by seed) "
                             + " ".join(_cell(diffs.get(f), 18) for f in MAIN_FIELDS))
    budgets = _budget_names(table)
    lines.append("")
    lines.append(f"{'sampler':>16} " + " ".join(f"{'FID ' + n:>18} {'SWD ' + n:>18}" for n in table))
    for budget in budgets:
        lines.append(f"{budget:>16} " + " ".join(
            _cell(entry.get(f"fid@{budget}"), 18) + " " + _cell(entry.get(f"swd@{budget}"), 18)
            for entry in table.values()))
    for name, entry in table.items():
        for key, diffs in entry.items():
            if key.startswith("minus_"):
                lines.append(f"{name + ' − ' + key[6:]:>25} (paired FID by sampler) "
                             + " ".join(f"{budget} {_cell(diffs.get(f'fid@{budget}'), 18).strip()};"
                                        for budget in budgets))
    return "\n".join(lines)


def _budget_names(table: dict) -> list[str]:
    entry = next(iter(table.values()))
    return [key[4:] for key in entry if key.startswith("swd@")]


def seed_classifier(split: DisjointSplit, cache_dir: str, seed: int) -> torch.nn.Module | None:
    """The FID classifier of one seed of a comparison: trained once on the seed's two training sets and cached in
    the comparison folder, so every later score of that folder (tables, ablations) uses the same feature space.
    None when the images have no labels (SWD only)."""
    if split.labels_a is None:
        return None
    return feature_classifier(torch.cat([split.train_a, split.train_b]), torch.cat([split.labels_a, split.labels_b]),
                              os.path.join(cache_dir, f"classifier_seed{seed}.pt"), seed=seed)


def compare_runs(results: dict[str, dict[int, dict]], run_dirs: dict[str, dict[int, str]], config, cache_dir: str,
                 budgets: str = SAMPLING_BUDGETS) -> dict:
    """The comparison table of finished runs: `results[weighting][seed]` (an Experiment's report) from
    `run_dirs[weighting][seed]`; `config` (a RunConfig) names the data and split sizes, the seed picks the split.
    Each seed's FID classifier is trained once on that seed's training split and cached in `cache_dir` (FID needs
    labels: without them, SWD only). `budgets`: the samplers the final models are re-sampled with."""
    source = load_images(config.data, image_size=config.image_size, channels=config.channels)
    per_run: dict[str, dict[int, dict]] = {name: {} for name in results}
    for seed in next(iter(results.values())):
        split = split_disjoint(source, config.n_train, config.n_test, seed=seed)
        classifier = seed_classifier(split, cache_dir, seed)
        for name in results:
            per_run[name][seed] = run_quality(run_dirs[name][seed], results[name][seed], split.test, classifier,
                                              budgets)
    return summarize(per_run)


def plot_budgets(table: dict, path: str, num_timesteps: int) -> None:
    """FID (or SWD without labels) against sampling steps, one line per weighting and sampler, ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = _budget_names(table)
    if not budgets:
        return
    metric = "fid" if f"fid@{budgets[0]}" in next(iter(table.values())) else "swd"
    methods = dict.fromkeys(parse_budgets(b)[0][1] for b in budgets)
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, entry in table.items():
        for method in methods:
            mine = [b for b in budgets if parse_budgets(b)[0][1] == method]
            stats = [entry[f"{metric}@{b}"] for b in mine]
            axes.errorbar([budget_steps(b, num_timesteps) for b in mine], [v["mean"] for v in stats],
                          yerr=[v["std"] or 0.0 for v in stats], marker="o", capsize=3, label=f"{name}, {method}")
    axes.set_xscale("log")
    axes.set_xlabel("sampling steps")
    axes.set_ylabel(metric.upper() + " to the test set (mean ± std over seeds)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
