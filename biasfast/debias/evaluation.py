"""Debiasing metrics on a split with bias labels: unbiased (cell-mean), aligned, conflicting, worst-group."""

from __future__ import annotations


import torch
from torch import nn

from biasfast.data.colored_digits import NUM_CLASSES, ColoredSplit
from biasfast.debias.classifier import predict_logits
from biasfast.metrics.stats import mean_std

GROUP_METRICS = ("unbiased", "aligned", "conflicting", "worst_group")
FLAG_METRICS = ("flag_precision", "flag_recall")


def accuracy_metrics(predictions: torch.Tensor, split: ColoredSplit, num_classes: int = NUM_CLASSES) -> dict[str, float]:
    """LfF metrics over the (class, bias) cells present: unbiased = mean of cell accuracies, aligned = mean of the
    diagonal cells, conflicting = mean of the off-diagonal cells; worst_group = min accuracy over the
    (class × {aligned, conflicting}) groups (GroupDRO/JTT worst-group)."""
    if split.bias_labels is None:
        raise ValueError("split: evaluation needs bias_labels")
    correct = (predictions == split.labels).double()
    cell = split.labels * num_classes + split.bias_labels
    counts = torch.bincount(cell, minlength=num_classes**2)
    cell_acc = torch.zeros(num_classes**2, dtype=torch.float64).index_add(0, cell, correct) / counts.clamp_min(1)
    present = counts > 0
    diagonal = torch.eye(num_classes, dtype=torch.bool).flatten()
    group = split.labels * 2 + (~split.aligned).long()
    group_counts = torch.bincount(group, minlength=2 * num_classes)
    group_acc = torch.zeros(2 * num_classes, dtype=torch.float64).index_add(0, group, correct) / group_counts.clamp_min(1)

    def mean(mask: torch.Tensor) -> float:
        return float(cell_acc[mask & present].mean()) if (mask & present).any() else float("nan")

    return {
        "unbiased": mean(torch.ones_like(present)),
        "aligned": mean(diagonal),
        "conflicting": mean(~diagonal),
        "worst_group": float(group_acc[group_counts > 0].min()),
    }


def flag_quality(flagged: torch.Tensor, conflicting: torch.Tensor) -> dict[str, float]:
    """How well an amplifier's pseudo bias-conflicting flags match the true bias-conflicting samples.

    precision = true flags / flags and recall = true flags / truly conflicting samples; each is NaN where its
    denominator is 0 (no flags, or no conflicting samples), which the table prints as "n/a" rather than a number.
    A diagnostic only: it reads bias labels, which never reach training."""
    if flagged.dtype != torch.bool or conflicting.dtype != torch.bool or flagged.shape != conflicting.shape:
        raise ValueError(f"flagged, conflicting: expected two bool masks of one shape, got {flagged.dtype} "
                         f"{tuple(flagged.shape)} and {conflicting.dtype} {tuple(conflicting.shape)}")
    hits, flags, truth = int((flagged & conflicting).sum()), int(flagged.sum()), int(conflicting.sum())
    return {"flag_precision": hits / flags if flags else float("nan"),
            "flag_recall": hits / truth if truth else float("nan")}


def evaluate(model: nn.Module, split: ColoredSplit) -> dict[str, float]:
    return accuracy_metrics(predict_logits(model, split.images).argmax(1), split)


def summarize_runs(runs: list[dict[str, float]]) -> dict[str, tuple[float, float | None]]:
    """Mean and sample standard deviation of each metric over seeds (`metrics.stats.mean_std`)."""
    return {key: mean_std([run[key] for run in runs]) for key in runs[0]}
