"""`biasfast run` end to end (--quick), SIGKILL + --resume equals an uninterrupted run, bad input, bias-score."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from biasfast.apps.compare import QUICK_BUDGETS, parse_budgets
from biasfast.apps.main import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "biasfast", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


def _report(folder):
    with open(os.path.join(folder, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("quick") / "run")
    result = _cli("run", "--quick", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_quick_run_writes_every_output(quick_run):
    out, stdout = quick_run
    report = _report(out)
    steps = [c["step"] for c in report["checkpoints"]]
    assert steps == sorted(steps) and steps[-1] == report["config"]["steps"] and len(steps) >= 3
    for record in report["checkpoints"]:
        assert np.isfinite(record["test_loss"]) and len(record["loss_bins_a"]) == report["config"]["eval_bins"]
        assert -1 <= record["bias"]["score"] <= 1
        assert os.path.isfile(os.path.join(out, "samples", f"step_{record['step']:08d}.png"))
    assert report["tau_test"] in steps and report["tau_bias"] in steps + [None]
    assert report["split"]["n_train_a"] == report["split"]["n_train_b"] == report["config"]["n_train"]
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert "tau_bias" in stdout and "score" in stdout


def test_existing_output_needs_overwrite(quick_run, capsys):
    out, _ = quick_run
    assert main(["run", "--quick", "--out", out, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_sigkill_then_resume_equals_uninterrupted(quick_run, tmp_path):
    reference, _ = quick_run
    out = str(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, "-m", "biasfast", "run", "--quick", "--out", out, "--no-progress"],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = os.path.join(out, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(checkpoints) and any(n.endswith(".pt") for n in os.listdir(checkpoints)):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "report.json"))
    result = _cli("run", "--resume", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert _report(out) == _report(reference)


def test_resume_rejects_a_different_configuration(quick_run, capsys):
    out, _ = quick_run
    assert main(["run", "--resume", out, "--steps", "999", "--no-progress"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main(["run", "--resume", os.path.dirname(out), "--no-progress"]) == 2


def test_bad_run_arguments(tmp_path, capsys):
    assert main(["run", "--quick", "--weighting", "no_such", "--out", str(tmp_path / "w"), "--no-progress"]) == 2
    assert "no_such" in capsys.readouterr().err and not os.path.exists(tmp_path / "w" / "config.json")
    assert main(["run", "--quick", "--weighting", "constant,no_such", "--out", str(tmp_path / "c")]) == 2
    assert "no_such" in capsys.readouterr().err and not os.path.exists(tmp_path / "c")
    if not torch.cuda.is_available():
        assert main(["run", "--quick", "--device", "cuda", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err and not os.path.exists(tmp_path / "d")
    assert main(["run", "--quick", "--n-train", "2000", "--out", str(tmp_path / "n"), "--no-progress"]) == 2
    assert "fewer than the split needs" in capsys.readouterr().err
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    assert main(["run", "--quick", "--data", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "b")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bias_score_command(quick_run, tmp_path, capsys):
    import torch

    from biasfast.data import load_images, split_disjoint

    out, _ = quick_run
    config = _report(out)["config"]
    split = split_disjoint(load_images(None), config["n_train"], config["n_test"], seed=config["seed"])
    np.save(tmp_path / "a.npy", split.train_a.numpy())
    np.save(tmp_path / "b.npy", split.train_b.numpy())
    last = sorted(os.listdir(os.path.join(out, "samples")))[-1].replace(".png", ".pt")
    samples = torch.load(os.path.join(out, "samples", last), weights_only=True)
    np.save(tmp_path / "sa.npy", samples["samples_a"].numpy())
    torch.save(samples["samples_b"], tmp_path / "sb.pt")
    code = main(["bias-score", "--samples-a", str(tmp_path / "sa.npy"), "--samples-b", str(tmp_path / "sb.pt"),
                 "--train-a", str(tmp_path / "a.npy"), "--train-b", str(tmp_path / "b.npy"),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0
    with open(tmp_path / "r.json") as f:
        score = json.load(f)["score"]
    assert score == pytest.approx(_report(out)["final"]["score"], abs=1e-12)
    assert main(["bias-score", "--samples-a", str(tmp_path / "missing.npy"), "--samples-b", "x", "--train-a", "x",
                 "--train-b", "x"]) == 2
    capsys.readouterr()


def test_sampling_budgets_parse():
    assert parse_budgets("ddim10,dpmsolver++20,ddpm,ddpm100") == [
        ("ddim10", "ddim", 10), ("dpmsolver++20", "dpmsolver++", 20), ("ddpm", "ddpm", None), ("ddpm100", "ddpm", 100)]
    for bad in ("ddim", "euler10", "ddim0", "ddim1x", ""):
        with pytest.raises(ValueError, match="budgets: cannot read"):
            parse_budgets(bad)


def test_sliced_wasserstein_is_exact_for_shifts():
    import torch

    from biasfast.metrics.quality import sliced_wasserstein

    x = torch.randn(50, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x) == 0
    shift = torch.linspace(-1, 1, 9).view(1, 1, 3, 3)
    directions = torch.randn(9, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    expected = (shift.flatten().double() @ directions).abs().mean().item()
    assert sliced_wasserstein(x, x + shift, projections=16, seed=4) == pytest.approx(expected, rel=1e-6)
    assert sliced_wasserstein(x, x[:20] + 5) > sliced_wasserstein(x, x[:20])


def test_frechet_distance_and_cached_classifier(tmp_path):
    import torch

    from biasfast.data import load_digits, split_disjoint
    from biasfast.metrics.quality import classifier_fid, feature_classifier, frechet_distance

    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-6
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(5.25, rel=1e-6)  # covariance equal: |shift|²
    split = split_disjoint(load_digits(), 400, 300, seed=0)
    cache = str(tmp_path / "classifier.pt")
    net = feature_classifier(split.train_a, split.labels_a, cache, steps=200)
    accuracy = (net(split.test).argmax(1) == split.labels_test).double().mean().item()
    assert accuracy > 0.85 and os.path.isfile(cache)
    again = feature_classifier(split.train_a, split.labels_a, cache, steps=0)  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    near, far = classifier_fid(net, split.train_b, split.test), classifier_fid(net, -split.test, split.test)
    assert 0 <= near < far


def test_weighting_comparison_over_seeds_resumes(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["run", "--quick", "--weighting", "constant,debias", "--seeds", "3,1", "--out", out, "--no-progress"]
    assert main(argv) == 0
    with open(os.path.join(out, "comparison.json")) as f:
        table = json.load(f)
    for name in ("constant", "debias"):
        entry = table[name]
        assert entry["seeds"] == [1, 3] and entry["step"] == 60
        swd = [entry["per_seed"][s]["swd"] for s in ("1", "3")]
        assert entry["swd"]["mean"] == pytest.approx(np.mean(swd)) and entry["swd"]["std"] == pytest.approx(
            np.std(swd, ddof=1))
        assert entry["fid"]["n"] == 2 and entry["fid"]["std"] > 0
    paired = [table["debias"]["per_seed"][s]["test_loss"] - table["constant"]["per_seed"][s]["test_loss"]
              for s in ("1", "3")]
    assert table["debias"]["minus_constant"]["test_loss"]["mean"] == pytest.approx(np.mean(paired))
    # the final models re-sampled at every budget (--quick: DDIM 10, DPM-Solver++ 10, DDPM respaced to 20)
    for budget in QUICK_BUDGETS.split(","):
        fids = {name: [table[name]["per_seed"][s][f"fid@{budget}"] for s in ("1", "3")] for name in table}
        assert all(np.isfinite(v).all() for v in fids.values())
        assert table["debias"]["minus_constant"][f"fid@{budget}"]["mean"] == pytest.approx(
            np.mean(np.subtract(fids["debias"], fids["constant"])))
    budgets = {b: table["constant"]["per_seed"]["1"][f"fid@{b}"] for b in QUICK_BUDGETS.split(",")}
    assert len(set(budgets.values())) == len(budgets)  # every sampler gave its own samples
    assert os.path.getsize(os.path.join(out, "fid_vs_steps.png")) > 1000
    printed = capsys.readouterr().out
    assert "paired by seed" in printed and "dpmsolver++10" in printed and "paired FID by sampler" in printed

    # an interruption during the last run: its report and last checkpoint are gone; --resume finishes it
    last = os.path.join(out, "debias", "seed_1")
    os.unlink(os.path.join(last, "report.json"))
    os.unlink(os.path.join(last, "checkpoints", "step_00000060.pt"))
    os.unlink(os.path.join(out, "comparison.json"))
    assert main(["run", "--resume", out, "--no-progress"]) == 0
    with open(os.path.join(out, "comparison.json")) as f:
        assert json.load(f) == table

    assert main(argv) == 2
    assert "already holds a comparison" in capsys.readouterr().err
    assert main(["run", "--resume", out, "--steps", "10", "--no-progress"]) == 2
    assert "without run options" in capsys.readouterr().err
    assert main(["run", "--quick", "--seeds", "1,2", "--budgets", "ddim,plms5", "--out", str(tmp_path / "p")]) == 2
    assert "budgets: cannot read 'ddim'" in capsys.readouterr().err and not os.path.exists(tmp_path / "p")
    assert main(["run", "--quick", "--seeds", "1,2", "--budgets", "ddim2000", "--out", str(tmp_path / "p")]) == 2
    assert "more steps than the schedule's 1000" in capsys.readouterr().err
    assert main(["run", "--quick", "--budgets", "ddim10", "--out", str(tmp_path / "p")]) == 2
    assert "budgets: only used by a comparison" in capsys.readouterr().err
    assert main(["run", "--quick", "--seeds", "1,x", "--out", str(tmp_path / "s")]) == 2
    assert "seeds" in capsys.readouterr().err
    assert main(["run", "--quick", "--seed", "1", "--seeds", "1,2", "--out", str(tmp_path / "s")]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err
