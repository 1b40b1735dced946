"""The four bias-mechanism experiments of the biased-generalization paper on the hierarchical model.

Each takes a trained pair (`PairTrainer`: model A on block 0, model B on block 1, checkpoints on a log-spaced epoch
grid) and returns a JSON-ready dict with the curves against epoch and a `phase` entry: the epoch of each curve's
minimum, the curves ordered by that epoch, and the biased window (τ_bias, τ_test) when the bias signal reaches its
minimum before the test-loss proxy does (the paper's reading: between the two the model still improves on fresh
data while drifting towards its own training samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from biasfast.hierarchy.diffusion import bp_estimate, network_estimate
from biasfast.hierarchy.measures import (argmin_epoch, loss_terms, nn_histogram, overlap,
                                         sequence_kl)
from biasfast.hierarchy.train import PairTrainer, cross_entropy
from biasfast._core.seeds import generator_for
from biasfast.metrics.stats import histogram_kl, mean_se
from biasfast.neighbors.knn import knn

EXPERIMENTS = ("sequential", "nn-divergence", "loss-decomposition", "uturn")


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of the evaluations (the trained pair is configured by `PairConfig`)."""

    n_eval: int = 1000         # evaluation sequences per set (train: at most the block), or generated sequences
    reps: int = 2              # noise draws per sequence (sequential, uturn)
    sample_steps: int = 50     # reverse steps of the sampler from t = T (nn-divergence); 0 = all T
    max_epochs: int = 0        # evaluate at most this many checkpoints, evenly spread over the grid (0 = all)
    t_fraction: float = 0.15   # sequential: the fixed t/T
    loss_t_fraction: float = 0.3  # loss-decomposition: the fixed t/T
    uturn_fractions: tuple[float, ...] = (0.01, 0.03, 0.05, 0.085, 0.12)
    batch: int = 4096          # forward-pass batch
    seed: int = 0


def _generator(seed: int, *key: object) -> torch.Generator:
    return generator_for(seed, "hierarchy-eval", *key)


@torch.no_grad()
def _logits(network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
    """The network's logits on the CPU, computed `batch` sequences at a time on the network's device."""
    device = next(network.parameters()).device
    t = torch.as_tensor(t).expand(x_t.shape[0])
    return torch.cat([network(x_t[i : i + batch].to(device), t[i : i + batch].to(device)).cpu()
                      for i in range(0, x_t.shape[0], batch)])


def _epochs(trainer: PairTrainer, config: EvalConfig) -> list[int]:
    """The checkpoint epochs to evaluate: the whole grid, or `max_epochs` of it evenly spread (last included)."""
    grid = trainer.config.epoch_grid()
    if not config.max_epochs or config.max_epochs >= len(grid):
        return grid
    picks = torch.linspace(0, len(grid) - 1, config.max_epochs).round().long().tolist()
    return [grid[i] for i in sorted(set(picks))]


def _eval_sets(trainer: PairTrainer, n_eval: int) -> dict[str, torch.Tensor]:
    """Model A's training sequences and fresh test sequences, copy-free against both training blocks."""
    config = trainer.config
    _, test = trainer.data.split(2 * config.n_train, n_eval, block=0)  # rows 0..2n: blocks 0 and 1 together
    return {"train": trainer.blocks["A"][:n_eval], "test": test}


def _record(curves: dict[str, dict[str, list]], key: str, values: torch.Tensor) -> None:
    """Append the mean and standard error of `values` to curve `key`."""
    mean, se = mean_se(values)
    entry = curves.setdefault(key, {"mean": [], "se": []})
    entry["mean"].append(mean)
    entry["se"].append(se)


def _phase(epochs: list[int], curves: dict[str, list[float]], bias: str, test: str) -> dict:
    minima = {name: argmin_epoch(epochs, values) for name, values in curves.items()}
    order: list[list] = []  # [epoch, curves with their minimum there], by epoch
    for name in sorted((n for n in minima if minima[n] is not None), key=lambda n: minima[n]):
        if order and order[-1][0] == minima[name]:
            order[-1][1].append(name)
        else:
            order.append([minima[name], [name]])
    tau_bias, tau_test = minima.get(bias), minima.get(test)
    window = [tau_bias, tau_test] if tau_bias is not None and tau_test is not None and tau_bias < tau_test else None
    return {"minima": minima, "order": order, "tau_bias": tau_bias, "tau_test": tau_test,
            "bias_curve": bias, "test_curve": test, "biased_window": window,
            "test_still_falling": tau_test is not None and tau_test == epochs[-1]}


def sequential(trainer: PairTrainer, config: EvalConfig, progress: bool = True) -> dict:
    """KL(BP_k ‖ model) for k = 0..depth and KL(model_A ‖ model_B) against epoch at t/T = `t_fraction`."""
    data, diffusion, epochs = trainer.data, trainer.diffusion, _epochs(trainer, config)
    t = diffusion.timestep(config.t_fraction)
    alpha = float(diffusion.alpha_bar[t])
    inputs, oracles = {}, {}
    for name, x0 in _eval_sets(trainer, config.n_eval).items():
        x0 = x0.repeat(config.reps, 1)
        inputs[name] = diffusion.noise(x0, t, _generator(config.seed, "sequential", name))
        oracles[name] = [data.filtered_denoiser(inputs[name], alpha, k) for k in range(data.depth + 1)]
    curves: dict[str, dict[str, list]] = {}
    for epoch in tqdm(epochs, desc="sequential", disable=not progress, leave=False):
        networks = {n: trainer.weights(n, epoch) for n in ("A", "B")}
        for name, x_t in inputs.items():
            p = {n: _logits(net, x_t, torch.tensor(t), config.batch).softmax(-1) for n, net in networks.items()}
            _record(curves, f"{name}/KL(A||B)", sequence_kl(p["A"], p["B"]))
            for k, b_k in enumerate(oracles[name]):
                for n in ("A", "B"):
                    _record(curves, f"{name}/KL(BP_{k}||{n})", sequence_kl(b_k, p[n]))
    bias, test = "test/KL(A||B)", "test/KL(BP_0||A)"
    oracle_curves = {f"test/KL(BP_{k}||A)": curves[f"test/KL(BP_{k}||A)"]["mean"] for k in range(data.depth + 1)}
    phase = _phase(epochs, {bias: curves[bias]["mean"], **oracle_curves}, bias, test)
    # coarse first: the oracle BP_k the model is closest to at each checkpoint (k = depth: the most factorised)
    phase["nearest_oracle_k"] = [min(range(data.depth + 1), key=lambda k: oracle_curves[f"test/KL(BP_{k}||A)"][i])
                                 for i in range(len(epochs))]
    return {"experiment": "sequential", "t": t, "alpha_bar": alpha, "epochs": epochs, "curves": curves,
            "phase": phase}


def nn_divergence(trainer: PairTrainer, config: EvalConfig, progress: bool = True) -> dict:
    """KL of NN-Hamming histograms (generated vs fresh, to A's training set) and train/test loss against epoch."""
    data, diffusion, epochs = trainer.data, trainer.diffusion, _epochs(trainer, config)
    train = trainer.blocks["A"]
    sets = _eval_sets(trainer, config.n_eval)
    # the baseline is i.i.d. fresh data, accidental copies of training sequences included (not the copy-free set)
    fresh = data.rows(0, config.n_eval, stream=2)
    fresh_nn = knn(fresh, train, 1, metric="hamming")[0][:, 0]
    p_test = nn_histogram(fresh_nn, data.num_leaves)
    loss_inputs = {}
    for name, x0 in (("train", train), ("test", sets["test"])):
        generator = _generator(config.seed, "nn-loss", name)
        t = diffusion.random_timesteps(len(x0), generator)
        loss_inputs[name] = (x0, t, diffusion.noise(x0, t, generator))
    steps = config.sample_steps or None
    curves = {"nn_divergence": [], "train_loss": [], "test_loss": [], "copy_fraction": [], "nn_distance_gap": [],
              "nn_distance_gap_se": []}
    histograms = []
    for epoch in tqdm(epochs, desc="nn-divergence", disable=not progress, leave=False):
        network = trainer.weights("A", epoch)
        generated = diffusion.sample(network_estimate(network), config.n_eval, data.num_leaves, steps=steps,
                                     generator=_generator(config.seed, "nn-sample"))  # same x_T and noise each epoch
        gen_nn = knn(generated, train, 1, metric="hamming")[0][:, 0]
        p_gen = nn_histogram(gen_nn, data.num_leaves)
        histograms.append(p_gen.tolist())
        curves["nn_divergence"].append(histogram_kl(p_gen, p_test))
        curves["copy_fraction"].append(float((gen_nn == 0).double().mean()))
        # signed: < 0 when samples sit closer to the training set than fresh data do (the paper's proximity bias),
        # > 0 when they are farther (samples not yet as good as data); the KL alone cannot tell these apart
        curves["nn_distance_gap"].append(float(gen_nn.double().mean() - fresh_nn.double().mean()))
        gap_se = (mean_se(gen_nn.double())[1] ** 2 + mean_se(fresh_nn.double())[1] ** 2) ** 0.5
        curves["nn_distance_gap_se"].append(gap_se)
        for name, (x0, t, x_t) in loss_inputs.items():
            curves[f"{name}_loss"].append(float(cross_entropy(_logits(network, x_t, t, config.batch), x0)))
    phase = _phase(epochs, {k: curves[k] for k in ("nn_divergence", "test_loss")}, "nn_divergence", "test_loss")
    window = phase["biased_window"]
    if window:  # a rise of the KL is proximity bias only if samples then sit closer to the training set than data
        gaps = [g for e, g in zip(epochs, curves["nn_distance_gap"]) if window[0] < e <= window[1]]
        if gaps and sum(gaps) / len(gaps) >= 0:
            phase["biased_window"] = None
            phase["note"] = (f"after the NN-divergence minimum (epoch {window[0]}) generated sequences are on average "
                             "farther from the training set than fresh data: the rise is not proximity bias")
    return {"experiment": "nn-divergence", "length": data.num_leaves, "epochs": epochs, "curves": curves, "sample_steps": steps or
            diffusion.num_timesteps, "p_test": p_test.tolist(), "p_gen": histograms,
            "fresh_copy_fraction": float((fresh_nn == 0).double().mean()), "phase": phase}


def loss_decomposition(trainer: PairTrainer, config: EvalConfig, progress: bool = True) -> dict:
    """ℓ = ℓ* + ℓ̃ of model A on its training data and on fresh data, at t/T = `loss_t_fraction` and at random t."""
    data, diffusion, epochs = trainer.data, trainer.diffusion, _epochs(trainer, config)
    fixed_t = diffusion.timestep(config.loss_t_fraction)
    inputs = {}
    for name, x0 in _eval_sets(trainer, config.n_eval).items():
        for setting in ("fixed_t", "random_t"):
            generator = _generator(config.seed, "loss", name, setting)
            t = (torch.full((len(x0),), fixed_t) if setting == "fixed_t"
                 else diffusion.random_timesteps(len(x0), generator))
            x_t = diffusion.noise(x0, t, generator)
            inputs[f"{setting}/{name}"] = (x0, t, x_t, data.exact_denoiser(x_t, diffusion.alpha_bar[t]))
    curves: dict[str, dict[str, list]] = {}
    for epoch in tqdm(epochs, desc="loss-decomposition", disable=not progress, leave=False):
        network = trainer.weights("A", epoch)
        for key, (x0, t, x_t, b0) in inputs.items():
            for term, values in loss_terms(_logits(network, x_t, t, config.batch), x0, b0).items():
                _record(curves, f"{key}/{term}", values)
    means = {k: v["mean"] for k, v in curves.items() if k.startswith("fixed_t/") and not k.endswith("bayes")}
    phase = _phase(epochs, means, "fixed_t/train/excess", "fixed_t/test/ce")
    # ℓ̃ keeps falling while the network memorises, so its onset (not its minimum) marks the bias: the first
    # checkpoint from which training ℓ̃ stays below zero by more than 2 standard errors
    excess = curves["fixed_t/train/excess"]
    below = [m + 2 * s < 0 for m, s in zip(excess["mean"], excess["se"])]
    onset = next((epochs[i] for i in range(len(epochs)) if all(below[i:])), None)
    phase.update(bias_curve="fixed_t/train/excess < 0 (2 SE)", tau_bias=onset, train_excess_negative_from=onset,
                 biased_window=[onset, phase["tau_test"]] if onset is not None and phase["tau_test"] is not None
                 and onset < phase["tau_test"] else None)
    return {"experiment": "loss-decomposition", "t": fixed_t, "alpha_bar": float(diffusion.alpha_bar[fixed_t]),
            "epochs": epochs, "curves": curves, "phase": phase}


def uturn(trainer: PairTrainer, config: EvalConfig, progress: bool = True) -> dict:
    """Overlap with the start of model-denoised / BP-denoised U-turns from small t, on train vs test sequences."""
    data, diffusion, epochs = trainer.data, trainer.diffusion, _epochs(trainer, config)
    timesteps = sorted({diffusion.timestep(f) for f in config.uturn_fractions})
    starts, bp_overlap = {}, {}
    for name, x0 in _eval_sets(trainer, config.n_eval).items():
        for t in timesteps:
            x_t = diffusion.noise(x0.repeat(config.reps, 1), t, _generator(config.seed, "uturn", name, t))
            starts[name, t] = (x0, x_t)
            bp_tokens = diffusion.denoise(x_t, t, bp_estimate(data, diffusion), generator=_generator(config.seed,
                                          "uturn-bp", name, t))
            bp_overlap[name, t] = overlap(bp_tokens, x0.repeat(config.reps, 1)).reshape(config.reps, -1).mean(0)
    curves = {f"{name}/t={t}": {"ratio": [], "se": []} for name, t in starts}
    for epoch in tqdm(epochs, desc="uturn", disable=not progress, leave=False):
        estimate = network_estimate(trainer.weights("A", epoch))
        for (name, t), (x0, x_t) in starts.items():
            tokens = diffusion.denoise(x_t, t, estimate, generator=_generator(config.seed, "uturn-model", name, t))
            model_overlap = overlap(tokens, x0.repeat(config.reps, 1)).reshape(config.reps, -1).mean(0)
            mean, se = mean_se(model_overlap / bp_overlap[name, t].clamp_min(1.0 / data.num_leaves))
            curves[f"{name}/t={t}"]["ratio"].append(mean)
            curves[f"{name}/t={t}"]["se"].append(se)
    phase = {**uturn_phase(curves, timesteps, epochs),
             "bp_overlap": {f"{n}/t={t}": float(v.mean()) for (n, t), v in bp_overlap.items()}}
    return {"experiment": "uturn", "timesteps": timesteps, "epochs": epochs, "curves": curves, "phase": phase}


def uturn_phase(curves: dict, timesteps: list[int], epochs: list[int]) -> dict:
    """The U-turn readings from the train/test overlap-ratio curves: the mean train − test gap per checkpoint, its
    largest, the first checkpoint separated by 2 SE at every start time, and the paper's sign read after learning
    has started: the gap's minimum and the first later checkpoint where the gap exceeds its value there by 2 SE
    at every start time. A copy-free test set of rarer sequences gives an offset before any learning (the gap at
    the first checkpoint), so the first separation alone is not the sign; the regrowth after the minimum is."""
    gaps = {}  # t -> [(train − test ratio, its SE)] per checkpoint
    for t in timesteps:
        train, test = curves[f"train/t={t}"], curves[f"test/t={t}"]
        gaps[t] = [(tr - te, (s_tr**2 + s_te**2) ** 0.5)
                   for tr, te, s_tr, s_te in zip(train["ratio"], test["ratio"], train["se"], test["se"])]
    checkpoints = range(len(epochs))
    gap = [sum(gaps[t][i][0] for t in timesteps) / len(timesteps) for i in checkpoints]
    separated = [epochs[i] for i in checkpoints if all(gaps[t][i][0] > 2 * gaps[t][i][1] for t in timesteps)]
    low = min(checkpoints, key=gap.__getitem__)
    grown = [epochs[j] for j in checkpoints[low + 1:]
             if all(gaps[t][j][0] - gaps[t][low][0] > 2 * (gaps[t][j][1] ** 2 + gaps[t][low][1] ** 2) ** 0.5
                    for t in timesteps)]
    return {"train_minus_test_gap": gap, "largest_gap_epoch": epochs[max(checkpoints, key=gap.__getitem__)],
            "separated_from": separated[0] if separated else None,
            "gap_minimum_epoch": epochs[low], "regrowth_from": grown[0] if grown else None}


RUNNERS = {"sequential": sequential, "nn-divergence": nn_divergence, "loss-decomposition": loss_decomposition,
           "uturn": uturn}
