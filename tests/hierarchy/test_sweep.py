"""The sweep script's bookkeeping: which checkpoints count for the proximity sign, and adding an experiment to a
finished configuration without rerunning the others."""

import json

from benchmarks import hierarchy_sweep


def _nn_result(epochs, gaps, se, tau_bias):
    return {"epochs": epochs, "phase": {"tau_bias": tau_bias, "biased_window": None},
            "fresh_copy_fraction": 0.5,
            "curves": {"nn_distance_gap": gaps, "nn_distance_gap_se": se, "copy_fraction": [0.0] * len(epochs)}}


def _sequential_result(epochs, tau_bias):
    flat = {"mean": [1.0] * len(epochs)}
    return {"epochs": epochs, "curves": {"test/KL(A||B)": flat, "test/KL(BP_0||A)": flat, "train/KL(A||B)": flat},
            "phase": {"nearest_oracle_k": [3] * len(epochs), "biased_window": [tau_bias, epochs[-1]],
                      "tau_bias": tau_bias, "tau_test": epochs[-1], "test_still_falling": False}}


def test_proximity_sign_counts_checkpoints_after_the_kl_ab_minimum():
    # the gap is beyond 2 SE at 300 and 1000; the NN-divergence curve's own minimum is 1000, KL(A || B)'s is 30
    epochs = [10, 30, 100, 300, 1000]
    nn = _nn_result(epochs, [1.0, 0.5, 0.1, -0.2, -0.3], [0.05] * 5, tau_bias=1000)
    alone = hierarchy_sweep.signs({"nn-divergence": nn}, depth=3)["nn-divergence"]
    assert alone["after"] == 1000 and alone["closer_than_fresh_2se_at"] == []
    both = hierarchy_sweep.signs({"nn-divergence": nn, "sequential": _sequential_result(epochs, 30)}, depth=3)
    assert both["nn-divergence"]["after"] == 30 and both["nn-divergence"]["closer_than_fresh_2se_at"] == [300, 1000]
    assert both["nn-divergence"]["tau_bias"] == 1000  # the curve's own minimum is still reported


def test_adding_an_experiment_runs_only_that_one(tmp_path, monkeypatch):
    calls = []

    def fake(name, phase):
        def run(trainer, evaluation, progress):
            calls.append(name)
            return {"experiment": name, "phase": phase}
        return run

    monkeypatch.setitem(hierarchy_sweep.RUNNERS, "loss-decomposition", fake(
        "loss-decomposition", {"train_excess_negative_from": 4, "biased_window": None}))
    monkeypatch.setitem(hierarchy_sweep.RUNNERS, "uturn", fake(
        "uturn", {"separated_from": 2, "largest_gap_epoch": 4, "train_minus_test_gap": [0.1, 0.3],
                  "gap_minimum_epoch": 2, "regrowth_from": 4}))
    config = ("tiny:q=3,depth=2,q_eff=2,n_train=4,batch_size=4,width=8,layers=1,epochs=4,checkpoints=2,"
              "first_checkpoint=2")
    first = hierarchy_sweep.run_config(config, str(tmp_path), ["loss-decomposition"], progress=False)
    assert first["results"] == ["loss-decomposition"] and calls == ["loss-decomposition"]
    both = hierarchy_sweep.run_config(config, str(tmp_path), ["loss-decomposition", "uturn"], progress=False)
    assert calls == ["loss-decomposition", "uturn"]  # the first experiment was read back, not rerun
    assert both["results"] == ["loss-decomposition", "uturn"]
    assert both["signs"]["loss-decomposition"]["excess_negative_from"] == 4
    assert both["signs"]["uturn"] == {"separated_from": 2, "largest_gap_epoch": 4, "largest_gap": 0.3,
                                      "gap_minimum_epoch": 2, "regrowth_from": 4}
    assert hierarchy_sweep.table(str(tmp_path)).splitlines()[-1].endswith("| 2 | 4 |")
    assert both["eval_time"]["loss-decomposition"] == first["eval_time"]["loss-decomposition"]
    stored = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert stored["results"] == both["results"]
    assert hierarchy_sweep.run_config(config, str(tmp_path), ["uturn"], progress=False)["results"] == both["results"]
    assert calls == ["loss-decomposition", "uturn"]  # everything asked for is there: nothing runs
