"""The reference FIDs WEIGHTING.md reads model FIDs against: a copier of the training images must score far from
real unused digits, in the classifier space a comparison folder caches (and reuses)."""

import json

from benchmarks.apps.fid_floors import floor_fids


def _comparison(folder, base: dict, seeds: list[int]) -> str:
    (folder / "plan.json").write_text(json.dumps({"base": base, "weightings": ["constant"], "seeds": seeds}))
    return str(folder)


def test_a_copier_scores_worse_than_unused_real_digits(tmp_path):
    (row,) = floor_fids(_comparison(tmp_path, {}, [1]))  # the defaults: 128 images per set, 512 test, 512 samples
    assert row["n_unused"] == 1797 - 2 * 128 - 512 and row["draws"] == 512
    assert row["unused"] is not None and row["copier"] > 2 * row["unused"]
    assert row["copier"] == (row["copier_a"] + row["copier_b"]) / 2
    assert (tmp_path / "classifier_seed1.pt").is_file()  # the classifier is the cached one a comparison reuses


def test_too_few_unused_digits_give_no_fresh_score(tmp_path):
    (row,) = floor_fids(_comparison(tmp_path, {"n_train": 640}, [0]))
    assert row["unused"] is None and row["n_unused"] == 5
