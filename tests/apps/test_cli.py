"""`biasfast run` end to end (--quick), SIGKILL + --resume equals an uninterrupted run, bad input, bias-score."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from biasfast.apps.compare import QUICK_BUDGETS, parse_budgets
from biasfast.apps.main import main

from tests.apps.interrupted import ENV, kill, start_biasfast, wait_for


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
    from biasfast.data import load_images, split_disjoint
    from biasfast.metrics.bias import bias_score

    report = _report(out)
    config = report["config"]
    split = split_disjoint(load_images(None), config["n_train"], config["n_test"], seed=config["seed"])
    steps = [c["step"] for c in report["checkpoints"]]
    assert steps == sorted(steps) and steps[-1] == report["config"]["steps"] and len(steps) >= 3
    for record in report["checkpoints"]:
        assert np.isfinite(record["test_loss"]) and len(record["loss_bins_a"]) == report["config"]["eval_bins"]
        # every stored bias record is bias_score of that checkpoint's stored samples, recomputed here
        samples = torch.load(os.path.join(out, "samples", f"step_{record['step']:08d}.pt"), weights_only=True)
        again = bias_score(samples["samples_a"], samples["samples_b"], split.train_a, split.train_b,
                           metric="pearson", test=split.test)
        assert json.loads(json.dumps(again.to_dict(per_sample=False))) == record["bias"]
        assert again.n_ties < again.n_samples and -1 <= again.score <= 1
        assert os.path.isfile(os.path.join(out, "samples", f"step_{record['step']:08d}.png"))
    assert report["tau_test"] in steps and report["tau_bias"] in steps + [None]
    assert report["split"]["n_train_a"] == report["split"]["n_train_b"] == report["config"]["n_train"]
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert "tau_bias" in stdout and "score" in stdout


def test_existing_output_needs_overwrite(quick_run, capsys):
    out, _ = quick_run
    assert main(["run", "--quick", "--out", out, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _start(out, *hook):
    """`biasfast run` in a subprocess: plain, or stopping at a hook of tests/apps/interrupted.py."""
    argv = ["run", "--resume", out] if os.path.isfile(os.path.join(out, "config.json")) else ["run", "--quick",
                                                                                              "--out", out]
    return start_biasfast([*argv, "--no-progress"], *hook)


def _checkpoints(out):
    folder = os.path.join(out, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _report_bytes(folder):
    with open(os.path.join(folder, "report.json"), "rb") as f:
        return f.read()


def test_sigkill_at_three_points_then_resume_equals_uninterrupted(quick_run, tmp_path, capsys):
    """Killed after the first complete checkpoint, halfway through writing a checkpoint, inside sampling: each
    resume continues from the last complete checkpoint, and the final report is the uninterrupted run's, byte
    for byte (it holds no wall times)."""
    from biasfast._core.io import LOCK_FILE, load_checkpoint

    reference, _ = quick_run
    out = str(tmp_path / "killed")
    first = os.path.join(out, "checkpoints", "step_00000010.pt")
    process = _start(out)
    wait_for(process, lambda: os.path.isfile(first), "the first checkpoint")
    kill(process)
    assert load_checkpoint(first)["step"] == 10  # complete, under its final name
    kept = os.stat(first).st_ino  # a resume that restarted from scratch would replace it (same bytes, new file)
    assert not os.path.exists(os.path.join(out, "report.json"))
    assert os.path.isfile(os.path.join(out, LOCK_FILE))  # left by the killed run: stale, taken over below

    marker = str(tmp_path / "writing")
    process = _start(out, "write:checkpoints/step_:1", marker)
    wait_for(process, lambda: os.path.isfile(marker), "a checkpoint write")
    temporary = [n for n in _checkpoints(out) if n.endswith(".tmp")]
    assert len(temporary) == 1 and temporary[0].startswith(".step_"), _checkpoints(out)
    # while it runs, a second process on the same folder refuses and writes nothing
    before = _checkpoints(out)
    assert main(["run", "--resume", out, "--no-progress"]) == 2
    assert f"in use by another biasfast process (pid {process.pid}" in capsys.readouterr().err
    assert _checkpoints(out) == before
    kill(process)

    marker = str(tmp_path / "sampling")
    process = _start(out, "sampling:1", marker)
    wait_for(process, lambda: os.path.isfile(marker), "sampling")
    assert not any(n.endswith(".tmp") for n in _checkpoints(out))  # the interrupted write's leftovers are gone
    kill(process)

    assert main(["run", "--resume", out, "--no-progress"]) == 0  # in-process: one interpreter start less
    assert _report_bytes(out) == _report_bytes(reference)
    assert _checkpoints(out) == _checkpoints(reference) and not os.path.exists(os.path.join(out, LOCK_FILE))
    assert os.stat(first).st_ino == kept


def test_a_corrupted_checkpoint_is_named_and_resume_uses_the_one_before(quick_run, tmp_path):
    from biasfast._core.io import CorruptCheckpointError, load_checkpoint

    reference, _ = quick_run
    out = str(tmp_path / "corrupt")
    shutil.copytree(reference, out)
    os.unlink(os.path.join(out, "report.json"))
    last = os.path.join(out, "checkpoints", "step_00000060.pt")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    with pytest.raises(CorruptCheckpointError, match=re.escape(repr(last)) + " is truncated or corrupted"):
        load_checkpoint(last)
    with pytest.warns(UserWarning, match=r"step_00000060\.pt' is truncated or corrupted.*checkpoint before it"):
        assert main(["run", "--resume", out, "--no-progress"]) == 0
    assert _report_bytes(out) == _report_bytes(reference)
    assert load_checkpoint(last)["step"] == 60  # trained again and rewritten


def _failing_writes(monkeypatch, fails):
    """Patch the atomic writer so that writing a file for which `fails(path)` is true runs out of disk space
    halfway through."""
    import biasfast._core.io as atomic

    real = atomic.write_atomically

    def write_atomically(path, write, mode="w"):
        if not fails(str(path)):
            return real(path, write, mode)

        def disk_full(stream):
            stream.write(b"partial" if "b" in mode else "partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, disk_full, mode)

    monkeypatch.setattr(atomic, "write_atomically", write_atomically)


def test_a_failed_write_keeps_the_previous_checkpoint_and_report(quick_run, tmp_path, monkeypatch, capsys):
    from biasfast._core.io import load_checkpoint

    reference, _ = quick_run
    out = str(tmp_path / "full")
    _failing_writes(monkeypatch, lambda path: path.endswith("step_00000024.pt") and "checkpoints" in path)
    assert main(["run", "--quick", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "step_00000024.pt" in err and "No space left on device" in err
    assert _checkpoints(out) == ["step_00000010.pt"]  # no temporary left, the previous checkpoint readable
    assert load_checkpoint(os.path.join(out, "checkpoints", "step_00000010.pt"))["step"] == 10

    finished = str(tmp_path / "finished")
    shutil.copytree(reference, finished)
    _failing_writes(monkeypatch, lambda path: path.endswith("report.json"))
    assert main(["run", "--resume", finished, "--no-progress"]) == 2  # rebuilding the report fails
    assert "report.json" in capsys.readouterr().err
    assert _report_bytes(finished) == _report_bytes(reference)
    monkeypatch.undo()
    assert main(["run", "--resume", out, "--no-progress"]) == 0  # the disk has room again
    assert _report_bytes(out) == _report_bytes(reference)


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path):
    from biasfast._core.io import LOCK_FILE, folder_lock

    folder = tmp_path / "held"
    with folder_lock(folder):
        with pytest.raises(FileExistsError, match=rf"out: .*held' is in use by another biasfast process \(pid "
                                                   rf"{os.getpid()}"):
            with folder_lock(folder):
                pass
        assert (folder / LOCK_FILE).is_file()
    assert not (folder / LOCK_FILE).exists()  # released on exit
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK_FILE).write_text(f"{int(gone.stdout)} {socket.gethostname()}")
    with folder_lock(folder):  # its process has exited: stale
        assert (folder / LOCK_FILE).read_text().startswith(str(os.getpid()))
    with pytest.raises(RuntimeError), folder_lock(folder):
        raise RuntimeError("a failing run")
    assert not (folder / LOCK_FILE).exists()  # released on an exception too


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


def test_schedule_and_ema_warmup_options_reach_the_configuration():
    from biasfast.apps.main import _explicit_options, build_parser
    from biasfast.apps.run import RunConfig

    args = build_parser().parse_args(["run", "--schedule", "cosine", "--ema", "0.99", "--ema-warmup"])
    config = RunConfig(**_explicit_options(args))
    assert (config.schedule, config.ema_decay, config.ema_warmup) == ("cosine", 0.99, True)
    assert "ema_warmup" not in _explicit_options(build_parser().parse_args(["run"]))  # absent: the default
