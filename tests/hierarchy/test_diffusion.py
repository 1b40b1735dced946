"""Gaussian one-hot diffusion on the hierarchical model: noising, the DDPM posterior sampler, the transformer
denoiser and its training, the bias estimators and the `biasfast hierarchy` experiments."""

import argparse
import json
import math

import pytest
import torch

import biasfast.hierarchy.train as train_module
from biasfast.apps import hierarchy as hierarchy_app
from biasfast.apps.hierarchy import add_parser as add_hierarchy_parser
from biasfast.apps.main import main
from biasfast.hierarchy import FilteredHierarchicalModel
from biasfast.hierarchy.denoiser import SequenceDenoiser
from biasfast.hierarchy.diffusion import OneHotDiffusion, bp_estimate, network_estimate
from biasfast.hierarchy.experiments import uturn_phase
from biasfast.metrics.stats import histogram_kl
from biasfast.hierarchy.measures import (argmin_epoch, loss_terms, nn_histogram, overlap,
                                         sequence_kl)
from biasfast.hierarchy.train import STATE_FILE, PairConfig, PairTrainer, lr_factor

SMALL = dict(q=4, depth=3, sigma=1.3, q_eff=3, seed=3)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Small networks and batches: one thread (the CLI's default too)."""


def small_model():
    return FilteredHierarchicalModel(**SMALL)


# ---- forward process and schedule ----


def test_schedule_values_of_the_paper():
    diffusion = OneHotDiffusion(6)
    assert diffusion.num_timesteps == 500 and diffusion.alpha_bar[0] == 1
    assert diffusion.timestep(0.15) == 75 and diffusion.timestep(0.3) == 150
    assert diffusion.alpha_bar[75].item() == pytest.approx(0.789, abs=1e-3)
    assert diffusion.alpha_bar[150].item() == pytest.approx(0.397, abs=1e-3)
    assert diffusion.alpha_bar[500].item() == pytest.approx(4e-5, rel=0.1)
    t = diffusion.random_timesteps(20_000, torch.Generator().manual_seed(0))
    assert t.min() == 1 and t.max() == 500


def test_forward_noising_statistics():
    diffusion = OneHotDiffusion(6)
    tokens = torch.randint(6, (4000, 16), generator=torch.Generator().manual_seed(1))
    t = 150
    x_t = diffusion.noise(tokens, t, torch.Generator().manual_seed(2))
    alpha = diffusion.alpha_bar[t].item()
    residual = x_t - alpha**0.5 * torch.nn.functional.one_hot(tokens, 6)
    n = residual.numel()
    assert abs(residual.mean().item()) < 5 / math.sqrt(n)
    assert residual.var().item() == pytest.approx(1 - alpha, rel=0.02)
    # per-sample timesteps: each row is noised at its own level
    per_sample = diffusion.noise(tokens[:2], torch.tensor([1, 500]), torch.Generator().manual_seed(2))
    assert (per_sample[0] - torch.nn.functional.one_hot(tokens[0], 6)).abs().max() < 0.2
    assert per_sample[1].abs().max() > 1.5


@pytest.mark.parametrize("t,s", [(100, 99), (100, 40), (3, 0)])
def test_posterior_step_with_true_x0_keeps_the_forward_marginal(t, s):
    # x_t ~ q(x_t | x0), then x_s ~ q(x_s | x_t, x0) must be distributed as q(x_s | x0): mean sqrt(ᾱ_s)·x0,
    # variance 1 − ᾱ_s. A wrong mean coefficient or variance breaks this.
    diffusion = OneHotDiffusion(6)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(6, (20_000, 4), generator=generator)
    x0 = torch.nn.functional.one_hot(tokens, 6).float()
    x_t = diffusion.noise(tokens, t, generator)
    x_s = diffusion.posterior_step(x_t, t, s, x0, torch.randn(x_t.shape, generator=generator))
    a_s = diffusion.alpha_bar[s].item()
    residual = x_s - a_s**0.5 * x0
    assert abs(residual.mean().item()) < 5 / math.sqrt(residual.numel())
    assert residual.var().item() == pytest.approx(1 - a_s, rel=0.02, abs=1e-6)


def test_reverse_timesteps():
    diffusion = OneHotDiffusion(6)
    assert diffusion.reverse_timesteps(5) == [5, 4, 3, 2, 1, 0]
    grid = diffusion.reverse_timesteps(500, 50)
    assert grid[0] == 500 and grid[-1] == 0 and len(grid) == 51 and grid == sorted(grid, reverse=True)


# ---- the sampler ----


def test_sampler_with_exact_bp_produces_grammatical_sequences_of_the_model():
    # With the exact denoiser the sampler draws from the model: every sequence valid (no forbidden sibling pair),
    # mean log-likelihood = −entropy. The uniform "denoiser" (no knowledge) fails both checks.
    model = small_model()
    diffusion = OneHotDiffusion(model.q)
    sequences, probs = model.enumerate()
    entropy = -(probs * probs.log()).sum().item()
    samples = diffusion.sample(bp_estimate(model, diffusion), 1000, model.num_leaves,
                               generator=torch.Generator().manual_seed(0))
    log_p = model.log_likelihood(samples)
    assert torch.isfinite(log_p).all()
    pairs = samples.reshape(-1, 2)
    assert not any(((pairs[:, 0] == b) & (pairs[:, 1] == c)).any() for b, c in model.forbidden_pairs)
    se = log_p.std().item() / math.sqrt(len(log_p))
    assert log_p.mean().item() == pytest.approx(-entropy, abs=5 * se + 0.05)

    def uniform(x_t, t):
        return torch.full_like(x_t, 1 / model.q)

    noise = diffusion.sample(uniform, 200, model.num_leaves, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(model.log_likelihood(noise)).float().mean() > 0.5


def test_shared_noise_makes_paired_samples_identical_and_seeds_matter():
    torch.manual_seed(0)
    network = SequenceDenoiser(6, 16, width=16, layers=1).eval()
    diffusion = OneHotDiffusion(6)
    run = lambda seed: diffusion.sample(network_estimate(network), 64, 16, steps=20,
                                        generator=torch.Generator().manual_seed(seed))
    first, again, other = run(7), run(7), run(8)
    chunked = diffusion.sample(network_estimate(network, batch=10), 64, 16, steps=20,
                               generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and torch.equal(first, chunked)
    assert not torch.equal(first, other)
    assert first.shape == (64, 16) and first.dtype == torch.int64


def test_bp_denoising_beats_the_noisy_argmax_where_it_is_far_from_perfect():
    # t = 150 of 500: argmax of x_t recovers only ~half the tokens and its sequences are mostly ungrammatical.
    # The exact posterior (BP) must do clearly better per token (Bayes-optimal marginals, observed +0.06..0.09
    # over three noise draws on 4800 tokens, sd of the difference ~0.01), and the sampler driven by it must
    # return grammatical sequences that keep far more of x0 than one driven by an uninformative estimate.
    model = small_model()
    diffusion = OneHotDiffusion(model.q)
    x0 = model.sample(300, generator=torch.Generator().manual_seed(1))
    t = 150
    x_t = diffusion.noise(x0, t, torch.Generator().manual_seed(2))
    noisy = overlap(x_t.argmax(-1), x0).mean()
    assert 0.4 < noisy < 0.6
    posterior = model.filtered_denoiser(x_t, float(diffusion.alpha_bar[t]), 0)
    assert overlap(posterior.argmax(-1), x0).mean() > noisy + 0.04
    sampled = diffusion.denoise(x_t, t, bp_estimate(model, diffusion), generator=torch.Generator().manual_seed(3))
    blind = diffusion.denoise(x_t, t, lambda x, _: torch.full_like(x, 1 / model.q),
                              generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(model.log_likelihood(sampled)).all()
    assert torch.isfinite(model.log_likelihood(x_t.argmax(-1))).double().mean() < 0.3
    assert overlap(sampled, x0).mean() > max(0.38, 2 * overlap(blind, x0).mean())


# ---- network and training ----


def test_sequence_denoiser_shapes_and_default_size():
    net = SequenceDenoiser(6, 16)
    assert net.embed.out_features == 128 and len(net.encoder.layers) == 4
    assert net.encoder.layers[0].linear1.out_features == 256 and net.encoder.layers[0].self_attn.num_heads == 4
    out = net(torch.randn(3, 16, 6), torch.tensor([1, 250, 500]))
    assert out.shape == (3, 16, 6)
    with pytest.raises(ValueError, match=r"x_t: expected shape \(batch, 16, 6\)"):
        net(torch.randn(3, 15, 6), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="width: must be divisible by heads"):
        SequenceDenoiser(6, 16, width=30)


def test_lr_schedule_is_the_papers_default():
    assert lr_factor(0, 1000, 50) == 1.0
    assert lr_factor(25, 1000, 50) == pytest.approx(0.75)
    assert lr_factor(50, 1000, 50) == pytest.approx(0.5)
    assert lr_factor(1000, 1000, 50) == pytest.approx(0.1)


TINY_PAIR = dict(SMALL, n_train=48, epochs=4, checkpoints=2, first_checkpoint=2, width=16, layers=1, batch_size=32)


def _pair_config(**overrides):
    values = {k: v for k, v in TINY_PAIR.items() if k != "seed"}
    values["data_seed"] = SMALL["seed"]
    return PairConfig(**{**values, **overrides})


def test_training_resumes_bit_identically(tmp_path, monkeypatch):
    config = _pair_config()
    assert config.epoch_grid() == [2, 4]
    PairTrainer(config, str(tmp_path / "whole")).train(progress=False)

    saves = []
    real_save = train_module.save_atomic

    def crash_after_first_state(obj, path):
        real_save(obj, path)
        saves.append(path)
        if path.endswith("state.pt"):
            raise KeyboardInterrupt  # killed right after the epoch-2 state of the pair reached the disk

    monkeypatch.setattr(train_module, "save_atomic", crash_after_first_state)
    with pytest.raises(KeyboardInterrupt):
        PairTrainer(config, str(tmp_path / "cut")).train(progress=False)
    monkeypatch.setattr(train_module, "save_atomic", real_save)
    resumed = PairTrainer(config, str(tmp_path / "cut"))
    assert not resumed.done()
    resumed.train(progress=False)
    whole = PairTrainer(config, str(tmp_path / "whole"))
    for name in ("A", "B"):
        for a, b in zip(whole.weights(name, 4).state_dict().values(), resumed.weights(name, 4).state_dict().values()):
            assert torch.equal(a, b)
        assert whole.train_losses(name) == resumed.train_losses(name)
    assert not torch.equal(whole.weights("A", 4).head.weight, whole.weights("B", 4).head.weight)


def test_a_corrupted_training_state_is_named_and_the_pair_trains_again(tmp_path):
    config = _pair_config()
    trainer = PairTrainer(config, str(tmp_path))
    trainer.train(progress=False)
    before = {name: (trainer.weights(name, 4).state_dict(), trainer.train_losses(name)) for name in ("A", "B")}
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"pair_state\.pt' is truncated or corrupted.*the pair again from the start"):
        trainer.train(progress=False)
    for name, (weights, losses) in before.items():  # the same result, only slower
        assert all(torch.equal(a, b) for a, b in zip(weights.values(), trainer.weights(name, 4).state_dict().values()))
        assert trainer.train_losses(name) == losses


def test_cli_sigkill_mid_write_then_resume_equals_uninterrupted(tmp_path, capsys):
    """`biasfast hierarchy` killed halfway through writing the pair's second training state, with a second
    process refused meanwhile, resumes from the first and writes the uninterrupted result (wall times aside)."""
    from tests.apps.interrupted import kill, start_biasfast, wait_for

    reference, out, marker = tmp_path / "reference", tmp_path / "killed", tmp_path / "writing"
    assert main(["hierarchy", "sequential", "--out", str(reference)] + TINY_CLI) == 0
    process = start_biasfast(["hierarchy", "sequential", "--out", str(out)] + TINY_CLI, "write:models/pair_state.pt:2",
                             str(marker))
    wait_for(process, marker.is_file, "the second training-state write")
    models = out / "models" / "A"
    assert (models / "epoch_000002.pt").is_file() and len(list((out / "models").glob(".pair_state.pt.*.tmp"))) == 1
    kept = (models / "epoch_000001.pt").stat().st_ino
    assert main(["hierarchy", "sequential", "--out", str(out)] + TINY_CLI) == 2
    assert f"models: '{out / 'models'}' is in use by another biasfast process (pid {process.pid}" in \
        capsys.readouterr().err
    kill(process)
    assert main(["hierarchy", "sequential", "--out", str(out)] + TINY_CLI) == 0
    assert (models / "epoch_000001.pt").stat().st_ino == kept and not list((out / "models").rglob("*.tmp"))
    timing = ("wall_time_s", "train_time_s", "models")
    resumed, whole = (json.loads((folder / "sequential.json").read_text()) for folder in (out, reference))
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}


TIMING = ("wall_time_s", "train_time_s", "models")  # wall clocks, and the models folder's path


@pytest.fixture(scope="module")
def uninterrupted_sequential(tmp_path_factory) -> dict:
    """The result of `biasfast hierarchy sequential` on TINY_CLI run start to end in one process."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["hierarchy", "sequential", "--out", str(out)] + TINY_CLI) == 0
    return json.loads((out / "sequential.json").read_text())


def test_cli_sigkill_after_the_first_training_state_then_resume_equals_uninterrupted(tmp_path,
                                                                                    uninterrupted_sequential):
    """Killed just after the first training state (epoch 1) is complete on disk: rerunning the command resumes
    from it, not from scratch, and writes the uninterrupted result (wall times aside)."""
    from biasfast._core.io import LOCK_FILE, load_checkpoint
    from tests.apps.interrupted import kill, start_biasfast, wait_for

    out, marker = tmp_path / "killed", tmp_path / "saved"
    command = ["hierarchy", "sequential", "--out", str(out)] + TINY_CLI
    process = start_biasfast(command, f"written:models/{STATE_FILE}:1", str(marker))
    wait_for(process, marker.is_file, "the first complete training state")
    models = out / "models"
    assert load_checkpoint(models / STATE_FILE)["epoch"] == 1  # complete, under its final name, before the kill
    first = [models / name / "epoch_000001.pt" for name in ("A", "B")]
    kept = [path.stat().st_ino for path in first]  # a restart from scratch would write them again (new files)
    kill(process)
    assert not (models / "A" / "epoch_000002.pt").exists() and not (out / "sequential.json").exists()
    assert (models / LOCK_FILE).is_file()  # left by the killed process: stale, taken over by the rerun

    assert main(command) == 0
    assert [path.stat().st_ino for path in first] == kept
    assert not list(models.rglob("*.tmp")) and not (models / LOCK_FILE).exists()
    resumed = json.loads((out / "sequential.json").read_text())
    assert resumed["trained_now"] is True  # the rerun finished the training
    assert {k: v for k, v in resumed.items() if k not in TIMING} == \
        {k: v for k, v in uninterrupted_sequential.items() if k not in TIMING}


def test_cli_sigkill_during_evaluation_then_resume_equals_uninterrupted(tmp_path, uninterrupted_sequential):
    """Killed inside the experiment, after the pair is trained: rerunning the command reuses the trained pair as
    it is (no file of it rewritten) and writes the uninterrupted result; only wall times and trained_now (False:
    this run did not train) differ."""
    from biasfast._core.io import load_checkpoint
    from tests.apps.interrupted import kill, start_biasfast, wait_for

    out, marker = tmp_path / "killed", tmp_path / "evaluating"
    command = ["hierarchy", "sequential", "--out", str(out)] + TINY_CLI
    process = start_biasfast(command, "evaluating:3", str(marker))  # first checkpoint evaluated, second begun
    wait_for(process, marker.is_file, "the experiment")
    models = out / "models"
    assert load_checkpoint(models / STATE_FILE)["epoch"] == 4  # training finished before the evaluation began
    assert all((models / name / "epoch_000004.pt").is_file() for name in ("A", "B"))
    trained = {path: path.stat().st_ino for path in models.rglob("*.pt")}
    kill(process)
    assert not (out / "sequential.json").exists()

    assert main(command) == 0
    assert {path: path.stat().st_ino for path in models.rglob("*.pt")} == trained
    resumed = json.loads((out / "sequential.json").read_text())
    assert resumed["trained_now"] is False and uninterrupted_sequential["trained_now"] is True
    ignore = (*TIMING, "trained_now")
    assert {k: v for k, v in resumed.items() if k not in ignore} == \
        {k: v for k, v in uninterrupted_sequential.items() if k not in ignore}


def test_models_folder_with_other_settings_is_refused(tmp_path):
    PairTrainer(_pair_config(), str(tmp_path)).train(progress=False)
    with pytest.raises(ValueError, match=r"models: .* other settings \(epochs\)"):
        PairTrainer(_pair_config(epochs=5), str(tmp_path))


# ---- estimators against hand-computed cases ----


def test_sequence_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75) + math.log(2) + 1e-8 * math.log(1e-8 / 0.5)
    assert sequence_kl(p, q).item() == pytest.approx(expected, rel=1e-12)
    assert sequence_kl(q, q).item() == 0


def test_nn_histogram_and_histogram_kl_by_hand():
    hist = nn_histogram(torch.tensor([0.0, 0.0, 1.0, 16.0]), 16)
    assert hist.shape == (20,) and hist[0] == 0.5 and hist[1] == 0.25 and hist[-1] == 0.25
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    assert histogram_kl(p, q) == pytest.approx(math.log(2) + 1e-8 * math.log(1e-8 / 0.5), rel=1e-9)


def test_loss_terms_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    tokens = torch.tensor([[1]])
    b0 = torch.tensor([[[0.5, 0.5, 0.0]]])
    terms = loss_terms(logits, tokens, b0)
    assert terms["ce"].item() == pytest.approx(math.log(4))
    assert terms["distill"].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))
    assert terms["excess"].item() == pytest.approx(math.log(4) - 1.5 * math.log(2))
    assert terms["bayes"].item() == pytest.approx(math.log(2))


def test_excess_loss_averages_to_zero_on_fresh_data():
    # E[ℓ̃] = 0 on fresh data for any fixed network: ℓ̃ = −(x0 − E[x0|x_t])ᵀ log p has conditional mean 0.
    model = small_model()
    diffusion = OneHotDiffusion(model.q)
    x0 = model.sample(20_000, generator=torch.Generator().manual_seed(4))
    x_t = diffusion.noise(x0, 150, torch.Generator().manual_seed(5))
    logits = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(6)) + 2 * x_t
    excess = loss_terms(logits, x0, model.exact_denoiser(x_t, diffusion.alpha_bar[150].item()))["excess"]
    se = excess.std().item() / math.sqrt(len(excess))
    assert abs(excess.mean().item()) < 5 * se
    # ...while against the wrong posterior (the uniform one) the same average is clearly not zero
    wrong = loss_terms(logits, x0, torch.full_like(x_t, 1 / model.q))["excess"]
    assert abs(wrong.mean().item()) > 10 * wrong.std().item() / math.sqrt(len(wrong))


def test_overlap_and_argmin_by_hand():
    a = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]])
    b = torch.tensor([[0, 1, 0, 0], [1, 1, 1, 1]])
    assert overlap(a, b).tolist() == [0.5, 1.0]
    assert argmin_epoch([10, 20, 40], [3.0, 1.0, 1.0]) == 20
    assert argmin_epoch([10, 20], [math.nan, math.inf]) is None


def test_phase_reads_minima_order_and_window():
    from biasfast.hierarchy.experiments import _phase

    epochs = [10, 20, 40, 80]
    phase = _phase(epochs, {"bias": [3.0, 1.0, 2.0, 4.0], "test": [5.0, 4.0, 3.0, 3.5], "other": [2.0, 1.0, 0.5, 0.6]},
                   "bias", "test")
    assert phase["minima"] == {"bias": 20, "test": 40, "other": 40}
    assert phase["order"] == [[20, ["bias"]], [40, ["test", "other"]]]
    assert phase["biased_window"] == [20, 40] and not phase["test_still_falling"]
    late = _phase(epochs, {"bias": [1.0, 2.0, 3.0, 4.0], "test": [4.0, 3.0, 2.0, 1.0]}, "test", "bias")
    assert late["biased_window"] is None and not late["test_still_falling"]
    assert _phase(epochs, {"bias": [1.0, 2.0, 3.0, 4.0], "test": [4.0, 3.0, 2.0, 1.0]}, "bias", "test")[
        "test_still_falling"]


def test_uturn_regrowth_is_read_after_the_gaps_minimum_at_every_start_time():
    """An early offset (epoch 10), a dip (epoch 20), then regrowth that clears 2 SE at both start times only from
    epoch 40 (at 30 the second start time's growth is within its error)."""
    def curve(ratios, se):
        return {"ratio": ratios, "se": [se] * len(ratios)}

    epochs = [10, 20, 30, 40]
    curves = {"train/t=1": curve([0.90, 0.80, 0.90, 0.95], 0.01), "test/t=1": curve([0.80, 0.78, 0.78, 0.78], 0.01),
              "train/t=2": curve([0.70, 0.60, 0.62, 0.70], 0.01), "test/t=2": curve([0.60, 0.59, 0.59, 0.59], 0.01)}
    phase = uturn_phase(curves, [1, 2], epochs)
    assert (phase["gap_minimum_epoch"], phase["regrowth_from"]) == (20, 40)
    assert phase["separated_from"] == 10 and phase["largest_gap_epoch"] == 40  # the early offset separates first
    assert phase["train_minus_test_gap"] == pytest.approx([0.10, 0.015, 0.075, 0.14])
    curves["train/t=2"]["se"] = [0.05] * 4  # the same growth within 2 SE: no regrowth read
    phase = uturn_phase(curves, [1, 2], epochs)
    assert (phase["gap_minimum_epoch"], phase["regrowth_from"]) == (20, None)


# ---- the experiments through the CLI ----

TINY_CLI = ["--n-train", "48", "--epochs", "4", "--checkpoints", "3", "--first-checkpoint", "1", "--width", "16",
            "--layers", "1", "--n-eval", "24", "--reps", "2", "--sample-steps", "5", "--q", "4", "--depth", "3",
            "--q-eff", "3", "--no-progress"]


@pytest.fixture(scope="module")
def shared_models(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hierarchy-models"))


@pytest.mark.parametrize("experiment,keys", [
    ("sequential", ["test/KL(A||B)", "test/KL(BP_3||A)", "train/KL(BP_0||B)"]),
    ("nn-divergence", ["nn_divergence", "train_loss", "test_loss", "copy_fraction", "nn_distance_gap"]),
    ("loss-decomposition", ["fixed_t/train/excess", "random_t/test/distill", "fixed_t/test/bayes"]),
    ("uturn", ["train/t=5", "test/t=60"]),
])
def test_experiment_cli_writes_json_and_png(experiment, keys, tmp_path, shared_models, capsys):
    assert main(["hierarchy", experiment, "--out", str(tmp_path), "--models", shared_models] + TINY_CLI) == 0
    result = json.loads((tmp_path / f"{experiment}.json").read_text())
    assert result["experiment"] == experiment and result["epochs"] == [1, 2, 4]
    assert all(key in result["curves"] for key in keys)
    assert (tmp_path / f"{experiment}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "phase" in result and result["wall_time_s"] > 0
    assert f"wrote {tmp_path / experiment}.json" in capsys.readouterr().out


@pytest.mark.gpu
def test_experiment_cli_on_cuda_matches_the_cpu_reading(tmp_path, capsys):
    # Same seeds, same data and BP oracles on the CPU: the CUDA-trained pair gives the CPU's curves up to the
    # float32 rounding of a different device (a few training epochs of a tiny network amplify it mildly).
    curves = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["hierarchy", "loss-decomposition", "--out", str(out), "--device", device] + TINY_CLI) == 0
        result = json.loads((out / "loss-decomposition.json").read_text())
        assert result["epochs"] == [1, 2, 4]
        curves[device] = result["curves"]
    assert curves["cpu"].keys() == curves["cuda"].keys()
    for name, cpu in curves["cpu"].items():
        cpu_mean, cuda_mean = torch.tensor(cpu["mean"]), torch.tensor(curves["cuda"][name]["mean"])
        assert torch.isfinite(cuda_mean).all(), name
        torch.testing.assert_close(cuda_mean, cpu_mean, rtol=5e-2, atol=1e-2, msg=name)


# ---- bad input ----


def test_bad_inputs_name_the_argument(capsys):
    diffusion = OneHotDiffusion(6)
    cases = [
        (lambda: diffusion.noise(torch.full((2, 16), 6), 10), ValueError, r"tokens: tokens must lie in \[0, 6\)"),
        (lambda: diffusion.noise(torch.full((2, 16), -1), 10), ValueError, r"tokens: tokens must lie in \[0, 6\)"),
        (lambda: diffusion.noise(torch.zeros(2, 16), 10), TypeError, "tokens: expected an integer tensor"),
        (lambda: diffusion.noise(torch.zeros(2, 16, dtype=torch.long), 0), ValueError, r"t: timesteps must be integers in \[1, 500\]"),
        (lambda: diffusion.noise(torch.zeros(2, 16, dtype=torch.long), 501), ValueError, "t: timesteps must be"),
        (lambda: diffusion.denoise(torch.zeros(2, 16, 5), 10, lambda x, t: x), ValueError,
         r"x_t: expected a floating \(batch, length, 6\) tensor"),
        (lambda: diffusion.denoise(torch.zeros(2, 16, 6), 10, lambda x, t: x, steps=0), ValueError,
         "steps: expected a positive int"),
        (lambda: diffusion.timestep(0.0), ValueError, r"fraction: expected t/T in \(0, 1\]"),
        (lambda: OneHotDiffusion(1), ValueError, "q: expected an int"),
        (lambda: PairConfig(n_train=0), ValueError, "n_train: expected a positive int"),
        (lambda: PairConfig(lr=0.0), ValueError, "lr: expected a positive learning rate"),
        (lambda: sequence_kl(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, "q: shape"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    cli_cases = [(["--q-eff", "7"], "q_eff: must lie in [1, q]"), (["--depth", "0"], "depth: must be at least 1"),
                 (["--sigma", "0"], "sigma: must be positive"), (["--n-eval", "0"], "--n-eval: expected a positive int"),
                 (["--threads", "0"], "--threads: expected >= 1"), (["--device", "tpu9"], "--device: 'tpu9' is not a device")]
    if not torch.cuda.is_available():
        cli_cases.append((["--device", "cuda"], "CUDA is not available"))
    for argv, message in cli_cases:
        assert main(["hierarchy", "sequential", "--out", "/nonexistent-dir"] + argv) == 2
        assert message in capsys.readouterr().err


# ---- presets ----


def _parsed(*flags):
    parser = argparse.ArgumentParser()
    add_hierarchy_parser(parser.add_subparsers())
    return parser.parse_args(["hierarchy", "sequential", *flags])


def test_mechanism_preset_is_the_default_and_the_paper_grammar_stays_available():
    pair, _ = hierarchy_app._configs(_parsed())
    assert (pair.q, pair.depth, pair.q_eff, pair.n_train, pair.width, pair.epochs) == (4, 3, 2, 64, 32, 6000)
    assert hierarchy_app._configs(_parsed("--preset", "mechanism"))[0] == pair
    paper_grammar, evaluation = hierarchy_app._configs(_parsed("--preset", "paper-grammar", "--epochs", "7"))
    assert paper_grammar == PairConfig(epochs=7)  # the paper's grammar at the former CPU sizes, flags on top
    paper, evaluation = hierarchy_app._configs(_parsed("--paper-sizes"))
    assert (paper.q, paper.depth, paper.q_eff, paper.n_train, paper.width, paper.layers, paper.epochs) == \
        (6, 4, 4, 5000, 512, 8, 20000) and evaluation.n_eval == 3000
    staircase, _ = hierarchy_app._configs(_parsed("--preset", "staircase"))
    assert (staircase.q, staircase.depth, staircase.q_eff, staircase.sigma, staircase.n_train, staircase.batch_size,
            staircase.width, staircase.epochs, staircase.checkpoints) == (4, 3, 2, 0.1, 256, 64, 32, 20000, 18)
    with pytest.raises(ValueError, match="--preset: 'mechanism' cannot be combined with --paper-sizes"):
        hierarchy_app._configs(_parsed("--preset", "mechanism", "--paper-sizes"))


@pytest.mark.parametrize("preset,n_train,sigma", [(None, 64, 1.0), ("staircase", 256, 0.1)])
def test_cpu_presets_run_end_to_end_on_a_tiny_schedule(tmp_path, capsys, preset, n_train, sigma):
    # the preset's grammar and network with a 6-epoch schedule: every experiment reads the preset's pair
    tiny = ["--epochs", "6", "--checkpoints", "3", "--first-checkpoint", "2", "--n-eval", "16", "--sample-steps",
            "4", "--no-progress", "--models", str(tmp_path / "models")] + (["--preset", preset] if preset else [])
    for experiment in ("sequential", "loss-decomposition"):
        assert main(["hierarchy", experiment, "--out", str(tmp_path)] + tiny) == 0
        result = json.loads((tmp_path / f"{experiment}.json").read_text())
        assert {k: result["pair"][k] for k in ("q", "depth", "q_eff", "n_train", "width", "lr", "sigma")} == \
            dict(q=4, depth=3, q_eff=2, n_train=n_train, width=32, lr=3e-3, sigma=sigma)
        assert result["epochs"] == [2, 3, 6]
    assert len(result["curves"]["fixed_t/train/excess"]["mean"]) == 3
    assert "reused the pair" in capsys.readouterr().out  # the second experiment evaluated the first one's pair
