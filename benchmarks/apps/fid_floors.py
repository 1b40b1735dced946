"""Reference FIDs for a `biasfast run --weighting ...` comparison: what a model that only replays its own training
images would score (512 draws with replacement from train A and from train B, averaged), and what unused real
digits score, both against the comparison's test set in the same per-seed classifier space. A model's FID near
the copier's says FID cannot tell its samples from copies at this training-set size.

    python benchmarks/apps/fid_floors.py runs/wlong/c60k --n-train 128
"""

from __future__ import annotations

import argparse
import os

import torch

from biasfast.data import load_images, split_disjoint
from biasfast.metrics.quality import classifier_fid, feature_classifier


def floor_fids(comparison_dir: str, n_train: int, n_test: int, seeds: list[int], draws: int) -> list[dict]:
    """Per seed: the copier's FID (mean of A and B, and each) and the unused real digits' (None when too few)."""
    source = load_images(None)
    rows = []
    for seed in seeds:
        split = split_disjoint(source, n_train, None, seed=seed)  # test = the run's test rows, then the unused ones
        test, unused = split.test[:n_test], split.test[n_test:]
        classifier = feature_classifier(torch.cat([split.train_a, split.train_b]),
                                        torch.cat([split.labels_a, split.labels_b]),
                                        os.path.join(comparison_dir, f"classifier_seed{seed}.pt"), seed=seed)
        generator = torch.Generator().manual_seed(100 + seed)
        copier = [classifier_fid(classifier, train[torch.randint(len(train), (draws,), generator=generator)], test)
                  for train in (split.train_a, split.train_b)]
        fresh = classifier_fid(classifier, unused[:draws], test) if len(unused) >= draws else None
        rows.append({"seed": seed, "copier": sum(copier) / 2, "copier_a": copier[0], "copier_b": copier[1],
                     "unused": fresh, "n_unused": len(unused)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison_dir", help="a comparison folder (holds classifier_seed<s>.pt; made if missing)")
    parser.add_argument("--n-train", type=int, default=128, help="the runs' --n-train")
    parser.add_argument("--n-test", type=int, default=512, help="the runs' --n-test")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=512, help="images per FID (the runs' --samples)")
    args = parser.parse_args()
    for row in floor_fids(args.comparison_dir, args.n_train, args.n_test, [int(s) for s in args.seeds.split(",")],
                          args.draws):
        fresh = "n/a" if row["unused"] is None else f"{row['unused']:.1f}"
        print(f"seed {row['seed']}: copier FID {row['copier']:.1f} (A {row['copier_a']:.1f}, B {row['copier_b']:.1f}), "
              f"{args.draws} unused real digits {fresh} ({row['n_unused']} unused)")


if __name__ == "__main__":
    main()
