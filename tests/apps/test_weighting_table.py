"""The change-of-gap table WEIGHTING.md's ablations are read by: paired per seed, the 2-SE bar with one sign."""

from benchmarks.apps.weighting_table import change_table


def _arms(constant_before, debias_before, constant_after, debias_after) -> dict:
    values = {"c0": constant_before, "d0": debias_before, "c1": constant_after, "d1": debias_after}
    return {label: {str(s): {"ddim10": v[s]} for s in range(len(v))} for label, v in values.items()}


def test_a_change_on_every_seed_beyond_two_standard_errors_reads_yes():
    per_seed = _arms([50, 60, 70], [60, 68, 81], [40, 50, 60], [38, 49, 57])  # gaps +10, +8, +11 → −2, −1, −3
    _, _, row = change_table(per_seed, ["ddim10"], ("d0", "c0"), ("d1", "c1"))
    assert row == "| ddim10 | +10.0, +8.0, +11.0 | -2.0, -1.0, -3.0 | -12.0, -9.0, -14.0 | -11.7 ± 2.5 (1.5) | yes |"


def test_a_change_of_mixed_sign_or_within_two_standard_errors_reads_no():
    mixed = _arms([50, 60, 70], [60, 68, 81], [40, 50, 60], [52, 49, 57])  # changes +2, −9, −14
    assert change_table(mixed, ["ddim10"], ("d0", "c0"), ("d1", "c1"))[2].endswith("| no |")
    noisy = _arms([50, 60, 70], [60, 68, 81], [40, 50, 60], [49.5, 50, 58])  # −0.5, −8, −13: one sign, SE 3.6
    assert change_table(noisy, ["ddim10"], ("d0", "c0"), ("d1", "c1"))[2].endswith("| no |")


def test_budgets_with_fewer_than_two_paired_seeds_are_left_out():
    per_seed = _arms([50], [60], [40], [38])
    assert len(change_table(per_seed, ["ddim10"], ("d0", "c0"), ("d1", "c1"))) == 2  # the header only
