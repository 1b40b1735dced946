"""Sample quality of loss weightings at equal iterations, with the spread over seeds.

The weighting comparison of the main job (`biasfast run --weighting constant,debias --seeds 0,1,2`): every
(weighting, seed) run trains its models A and B for the same number of steps; the final samples of each model are
scored against the held-out test set by the sliced Wasserstein distance in pixel space and by the FID in the
feature space of a small digit classifier trained on that seed's training split. A seed fixes the split, the
shared initial weights and all noise, so runs of two weightings with one seed differ only by the weighting: the
paired differences per seed are the sharpest comparison, the spread over seeds says how much a single run can be
trusted.
"""

from __future__ import annotations

import os

import torch

from biasfast._core.io import load_checkpoint
from biasfast.apps.run import SAMPLE_DIR
from biasfast.data import load_images, split_disjoint
from biasfast.metrics.quality import classifier_fid, feature_classifier, sliced_wasserstein
from biasfast.metrics.stats import mean_std


def _mean_std(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def run_quality(run_dir: str, result: dict, test: torch.Tensor, classifier: torch.nn.Module | None) -> dict:
    """One run's final checkpoint: SWD (and FID) of models A and B to `test`, their test loss and bias score."""
    step = result["checkpoints"][-1]["step"]
    samples = load_checkpoint(os.path.join(run_dir, SAMPLE_DIR, f"step_{step:08d}.pt"))
    row = {"step": step, "test_loss": result["checkpoints"][-1]["test_loss"], "bias_score": result["final"]["score"]}
    swd = [sliced_wasserstein(samples[k], test) for k in ("samples_a", "samples_b")]
    row.update(swd_a=swd[0], swd_b=swd[1], swd=sum(swd) / 2)
    if classifier is not None:
        fid = [classifier_fid(classifier, samples[k], test) for k in ("samples_a", "samples_b")]
        row.update(fid_a=fid[0], fid_b=fid[1], fid=sum(fid) / 2)
    return row


QUALITY_FIELDS = ("swd", "fid", "test_loss", "bias_score")


def summarize(per_run: dict[str, dict[int, dict]]) -> dict:
    """Per weighting: each field's mean ± std over seeds, and (from the second weighting on) the paired
    difference to the first weighting over the seeds both ran."""
    table, names = {}, list(per_run)
    for name in names:
        rows = per_run[name]
        entry = {"seeds": sorted(rows), "per_seed": {str(s): rows[s] for s in sorted(rows)},
                 "step": next(iter(rows.values()))["step"]}
        for field in QUALITY_FIELDS:
            values = [row[field] for row in rows.values() if field in row]
            if values:
                entry[field] = _mean_std(values)
        if name != names[0]:
            base = per_run[names[0]]
            shared = sorted(set(rows) & set(base))
            entry["minus_" + names[0]] = {
                field: _mean_std([rows[s][field] - base[s][field] for s in shared])
                for field in QUALITY_FIELDS if shared and all(field in rows[s] and field in base[s] for s in shared)}
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
                     + " ".join(_cell(entry.get(f), 18) for f in QUALITY_FIELDS))
    for name, entry in table.items():
        for key, diffs in entry.items():
            if key.startswith("minus_"):
                lines.append(f"{name + ' − ' + key[6:]:>25} (paired by seed) "
                             + " ".join(_cell(diffs.get(f), 18) for f in QUALITY_FIELDS))
    return "\n".join(lines)


def compare_runs(results: dict[str, dict[int, dict]], run_dirs: dict[str, dict[int, str]], config, cache_dir: str
                 ) -> dict:
    """The comparison table of finished runs: `results[weighting][seed]` (an Experiment's report) from
    `run_dirs[weighting][seed]`; `config` (a RunConfig) names the data and split sizes, the seed picks the split.
    Each seed's FID classifier is trained once on that seed's training split and cached in `cache_dir` (FID needs
    labels: without them, SWD only)."""
    source = load_images(config.data, image_size=config.image_size, channels=config.channels)
    per_run: dict[str, dict[int, dict]] = {name: {} for name in results}
    for seed in next(iter(results.values())):
        split = split_disjoint(source, config.n_train, config.n_test, seed=seed)
        classifier = None
        if split.labels_a is not None:
            classifier = feature_classifier(torch.cat([split.train_a, split.train_b]),
                                            torch.cat([split.labels_a, split.labels_b]),
                                            os.path.join(cache_dir, f"classifier_seed{seed}.pt"), seed=seed)
        for name in results:
            per_run[name][seed] = run_quality(run_dirs[name][seed], results[name][seed], split.test, classifier)
    return summarize(per_run)
