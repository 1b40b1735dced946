"""The debias table: the Recipe I amplifier's flag precision/recall, paired DDB − real-amplifier differences, machine."""

import math
import os

import pytest
import torch

from biasfast.data.colored_digits import colored_digits
from biasfast.debias.benchmark import BenchmarkConfig, _fitted_amplifier, format_paired_differences, format_table, run_method
from biasfast.debias.classifier import ClassifierConfig
from biasfast.debias.evaluation import flag_quality


def test_flag_quality_hand_computed():
    flagged = torch.tensor([True, True, True, False, False, True])
    truth = torch.tensor([True, False, True, True, False, False])
    quality = flag_quality(flagged, truth)
    assert quality["flag_precision"] == pytest.approx(2 / 4)  # flags 0, 1, 2, 5; true among them: 0, 2
    assert quality["flag_recall"] == pytest.approx(2 / 3)  # truly conflicting 0, 2, 3


def test_flag_quality_undefined_ratios_are_nan_and_bad_masks_are_rejected():
    none = torch.zeros(4, dtype=torch.bool)
    quality = flag_quality(none, torch.tensor([True, False, False, False]))
    assert math.isnan(quality["flag_precision"]) and quality["flag_recall"] == 0.0
    assert math.isnan(flag_quality(torch.tensor([True, False]), torch.zeros(2, dtype=torch.bool))["flag_recall"])
    with pytest.raises(ValueError, match="flagged, conflicting: expected two bool masks"):
        flag_quality(torch.tensor([1, 0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="flagged, conflicting"):
        flag_quality(torch.tensor([True]), torch.tensor([True, False]))


def _run(unbiased, worst, precision=None, recall=None):
    out = {"unbiased": unbiased, "aligned": 0.9, "conflicting": 0.5, "worst_group": worst}
    if precision is not None:
        out |= {"flag_precision": precision, "flag_recall": recall}
    return out


def test_table_has_flag_columns_dashes_for_other_methods_and_na_for_undefined():
    results = {0.99: {"erm": [_run(0.5, 0.1), _run(0.7, 0.3)],
                      "ddb-1": [_run(0.6, 0.2, 0.25, 0.5), _run(0.8, 0.4, 0.75, 1.0)],
                      "ddb-real-1": [_run(0.6, 0.2, float("nan"), 0.0), _run(0.6, 0.2, 1.0, 0.5)]}}
    lines = format_table(results).splitlines()
    assert lines[0] == ("| aligned ratio | method | unbiased | aligned | conflicting | worst_group | flag_precision "
                        "| flag_recall |")
    assert lines[2].endswith("| 20.0 ± 14.1 | – | – |")
    assert lines[3].endswith("| 30.0 ± 14.1 | 50.0 ± 35.4 | 75.0 ± 35.4 |")
    assert lines[4].endswith("| n/a | 25.0 ± 35.4 |")


def test_paired_differences_are_per_seed_in_points():
    results = {0.99: {"ddb-1": [_run(0.60, 0.20), _run(0.80, 0.40), _run(0.50, 0.10)],
                      "ddb-real-1": [_run(0.65, 0.10), _run(0.70, 0.45), _run(0.50, 0.10)],
                      "erm": [_run(0.5, 0.1)] * 3}}
    text = format_paired_differences(results)
    assert text == ("- ratio 0.99, ddb-1 − ddb-real-1 per seed: unbiased -5.0, +10.0, +0.0 (mean +1.7 ± 7.6); "
                    "worst_group +10.0, -5.0, +0.0 (mean +1.7 ± 7.6)")
    assert format_paired_differences({0.99: {"ddb-1": results[0.99]["ddb-1"]}}) == ""  # no twin, no line


def test_recipe_one_reports_its_amplifier_flags_against_the_true_conflicting_samples():
    data = colored_digits(0.95, seed=0, repeats=1)
    config = BenchmarkConfig(repeats=1, classifier=ClassifierConfig(epochs=1, lr=3e-3),
                             amplifier=ClassifierConfig(epochs=3, lr=3e-3), width=4)
    cache: dict = {}
    metrics = run_method(data, "ddb-real-1", 0, config, cache=cache)
    flagged = _fitted_amplifier(data, "real", 0, config, None, cache).predict_conflicting(data.train.images,
                                                                                        data.train.labels)
    truth = ~data.train.aligned
    hits = int((flagged & truth).sum())
    assert 0 < hits < int(flagged.sum())  # neither trivial ratio, so the check below can tell them apart
    assert metrics["flag_precision"] == pytest.approx(hits / int(flagged.sum()))
    assert metrics["flag_recall"] == pytest.approx(hits / int(truth.sum()))


@pytest.mark.parametrize("ratios", ["0.99,1.5", "0.99,abc", ""])
def test_table_ratios_option_rejects_bad_lists(ratios, tmp_path):
    from biasfast.apps.main import main

    with pytest.raises(SystemExit, match="--ratios: expected a comma list"):
        main(["debias", "--table", "--ratios", ratios, "--out", str(tmp_path / "t.md")])


def test_table_report_names_the_machine_it_ran_on():
    from biasfast._core.buildinfo import cpu_model
    from biasfast.debias.benchmark import table_report

    report = table_report({0.99: {"erm": [_run(0.5, 0.1)]}}, command="biasfast debias --table", elapsed_s=60.0,
                          cpu_s=30.0, config=BenchmarkConfig())
    machine = next(line for line in report.splitlines() if line.startswith("- machine:"))
    assert machine.startswith(f"- machine: {cpu_model()}, {os.cpu_count()} cores, ")
