"""Reference FIDs for a `biasfast run --weighting ...` comparison: what a model that only replays its own training
images would score (as many draws with replacement from train A and from train B as a model makes samples,
averaged), and what as many unused real images score, both against the comparison's test set in the
comparison's own per-seed classifier space. A model's FID near the copier's says FID cannot tell its samples from
copies at this training-set size.

    python benchmarks/apps/fid_floors.py runs/wlong/c60k
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from biasfast.apps.compare import seed_classifier
from biasfast.apps.main import PLAN_FILE
from biasfast.apps.run import RunConfig
from biasfast.data import load_images, split_disjoint
from biasfast.metrics.quality import classifier_fid


def floor_fids(comparison_dir: str) -> list[dict]:
    """Per seed of the comparison: the copier's FID (mean of A and B, and each) and the unused real images' (None
    when fewer than a model's samples are left)."""
    with open(os.path.join(comparison_dir, PLAN_FILE)) as f:
        plan = json.load(f)
    config = RunConfig(**plan["base"])
    source = load_images(config.data, image_size=config.image_size, channels=config.channels)
    draws, rows = config.n_samples, []
    for seed in plan["seeds"]:
        split = split_disjoint(source, config.n_train, None, seed=seed)  # test = the run's test rows, then the rest
        test, unused = split.test[:config.n_test], split.test[config.n_test:]
        classifier = seed_classifier(split, comparison_dir, seed)
        if classifier is None:
            raise ValueError(f"{comparison_dir}: its images have no labels, so the comparison has no FID")
        generator = torch.Generator().manual_seed(100 + seed)
        copier = [classifier_fid(classifier, train[torch.randint(len(train), (draws,), generator=generator)], test)
                  for train in (split.train_a, split.train_b)]
        fresh = classifier_fid(classifier, unused[:draws], test) if len(unused) >= draws else None
        rows.append({"seed": seed, "copier": sum(copier) / 2, "copier_a": copier[0], "copier_b": copier[1],
                     "unused": fresh, "n_unused": len(unused), "draws": draws})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison_dir", help="a comparison folder (its plan.json; classifier_seed<s>.pt reused)")
    for row in floor_fids(parser.parse_args().comparison_dir):
        fresh = "n/a" if row["unused"] is None else f"{row['unused']:.1f}"
        print(f"seed {row['seed']}: copier FID {row['copier']:.1f} (A {row['copier_a']:.1f}, B {row['copier_b']:.1f}), "
              f"{row['draws']} unused real images {fresh} ({row['n_unused']} unused)")


if __name__ == "__main__":
    main()
