"""One PNG per hierarchical experiment (matplotlib, Agg backend), with the minima marked by dotted lines."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _mark(axis, epochs: dict[str, int | None], colors=("k", "r", "b", "g", "m")) -> None:
    for (label, epoch), color in zip(epochs.items(), colors):
        if epoch is not None:
            axis.axvline(epoch, color=color, linestyle=":", linewidth=1, label=f"min {label}: {epoch}")


def _band(axis, epochs, entry: dict, label: str, **style) -> None:
    mean, se = entry["mean"], entry["se"]
    (line,) = axis.plot(epochs, mean, marker="o", markersize=3, label=label, **style)
    axis.fill_between(epochs, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                      color=line.get_color(), alpha=0.2)


def _sequential(result: dict, figure) -> None:
    epochs, curves, phase = result["epochs"], result["curves"], result["phase"]
    depth = sum(1 for k in curves if k.startswith("test/KL(BP_") and k.endswith("||A)")) - 1
    for axis, split in zip(figure.subplots(1, 2), ("test", "train")):
        for k in range(depth, -1, -1):
            _band(axis, epochs, curves[f"{split}/KL(BP_{k}||A)"], f"KL(BP_{k} ‖ A)")
        _band(axis, epochs, curves[f"{split}/KL(A||B)"], "KL(A ‖ B)", color="k", linewidth=2)
        if split == "test":
            _mark(axis, {"KL(A‖B)": phase["tau_bias"], "KL(BP_0‖A)": phase["tau_test"]})
        axis.set(xscale="log", yscale="log", xlabel="epoch", ylabel="KL per sequence (nats)",
                 title=f"{split} inputs, t = {result['t']} (ᾱ = {result['alpha_bar']:.3f})")
        axis.legend(fontsize=7)


def _nn_divergence(result: dict, figure) -> None:
    epochs, curves, phase = result["epochs"], result["curves"], result["phase"]
    left, right = figure.subplots(1, 2)
    left.plot(epochs, curves["nn_divergence"], "k-o", markersize=3, label="NN divergence KL(P_gen ‖ P_test)")
    left.set(xscale="log", xlabel="epoch", ylabel="NN divergence")
    twin = left.twinx()
    twin.plot(epochs, curves["train_loss"], "b--", label="train loss")
    twin.plot(epochs, curves["test_loss"], "r--", label="test loss")
    twin.set_ylabel("cross-entropy (random t)")
    _mark(left, {"NN div.": phase["tau_bias"], "test loss": phase["tau_test"]})
    left.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    bins = len(result["p_test"])
    centers = [(i + 0.5) * result["length"] / bins for i in range(bins)]
    right.plot(centers, result["p_test"], "k-", linewidth=2, label="fresh data")
    for epoch, hist in list(zip(epochs, result["p_gen"]))[:: max(1, len(epochs) // 5)]:
        right.plot(centers, hist, alpha=0.7, label=f"generated, epoch {epoch}")
    right.set(xlabel="bin of Hamming distance to the nearest training sequence", ylabel="probability")
    right.legend(fontsize=7)


def _loss_decomposition(result: dict, figure) -> None:
    epochs, curves, phase = result["epochs"], result["curves"], result["phase"]
    left, right = figure.subplots(1, 2)
    for split, style in (("train", "-"), ("test", "--")):
        for term, color in (("ce", "k"), ("distill", "b"), ("bayes", "g")):
            left.plot(epochs, curves[f"fixed_t/{split}/{term}"]["mean"], color=color, linestyle=style,
                      label=f"{split} {dict(ce='ℓ (CE)', distill='ℓ*', bayes='H(b0), Bayes')[term]}")
        for setting, color in (("fixed_t", "r"), ("random_t", "m")):
            _band(right, epochs, curves[f"{setting}/{split}/excess"], f"{split} ℓ̃, {setting.replace('_', ' ')}",
                  color=color, linestyle=style)
    _mark(left, {"train ℓ̃ < 0 from": phase["tau_bias"], "test CE": phase["tau_test"]})
    right.axhline(0, color="grey", linewidth=0.5)
    left.set(xscale="log", xlabel="epoch", ylabel="nats per token", title=f"ℓ = ℓ* + ℓ̃ at t = {result['t']}")
    right.set(xscale="log", xlabel="epoch", ylabel="nats per token", title="excess ℓ̃ = ℓ − ℓ* (0 on fresh data)")
    left.legend(fontsize=6)
    right.legend(fontsize=6)


def _uturn(result: dict, figure) -> None:
    epochs, curves = result["epochs"], result["curves"]
    left, right = figure.subplots(1, 2)
    for t in result["timesteps"]:
        for split, style in (("train", "-"), ("test", "--")):
            entry = curves[f"{split}/t={t}"]
            left.plot(epochs, entry["ratio"], linestyle=style, marker="o", markersize=2, label=f"{split}, t = {t}")
    left.set(xscale="log", xlabel="epoch", ylabel="overlap ratio model / BP")
    left.legend(fontsize=6)
    right.plot(epochs, result["phase"]["train_minus_test_gap"], "k-o", markersize=3)
    right.axhline(0, color="grey", linewidth=0.5)
    right.set(xscale="log", xlabel="epoch", ylabel="train − test ratio (mean over t)")


PLOTTERS = {"sequential": _sequential, "nn-divergence": _nn_divergence, "loss-decomposition": _loss_decomposition,
            "uturn": _uturn}


def plot(result: dict) -> bytes:
    """The experiment's figure as PNG bytes."""
    figure = plt.figure(figsize=(12, 4.5))
    try:
        PLOTTERS[result["experiment"]](result, figure)
        figure.suptitle(f"hierarchy {result['experiment']}")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        return buffer.getvalue()
    finally:
        plt.close(figure)
