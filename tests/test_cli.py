"""`biasfast run` end to end (--quick), SIGKILL + --resume equals an uninterrupted run, bad input, bias-score."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from biasfast.__main__ import main

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
    assert report["tau_test"] in steps and report["tau_bias"] in steps
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


def test_sliced_wasserstein_is_exact_for_shifts():
    import torch

    from biasfast.experiment import sliced_wasserstein

    x = torch.randn(50, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x) == 0
    shift = torch.linspace(-1, 1, 9).view(1, 1, 3, 3)
    directions = torch.randn(9, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    expected = (shift.flatten().double() @ directions).abs().mean().item()
    assert sliced_wasserstein(x, x + shift, projections=16, seed=4) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein(x, x[:20] + 5) > sliced_wasserstein(x, x[:20])
