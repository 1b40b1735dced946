"""Target-model training: ERM, GroupDRO (Recipe I), LfF-style reweighting (Recipe II, and LfF itself), JTT.

Every recipe takes the biased training split (labels only; bias labels are never read) and an optional labelled
validation split used for model selection (best validation accuracy over epochs), as LfF/JTT/GroupDRO do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biasfast.data.colored_digits import NUM_CLASSES, ColoredSplit, check_labelled_images
from biasfast.debias.amplifier import BiasAmplifier
from biasfast.debias.classifier import KeepBest, SmallCNN, ClassifierConfig, predict_logits, run_epochs
from biasfast.debias.rules import PerSampleEMA, gce_loss, group_dro_step, group_means, jtt_indices, relative_difficulty


def _new_model(train: ColoredSplit, seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(NUM_CLASSES, train.images.shape[1], width)


def _selector(model: nn.Module, val: ColoredSplit | None) -> KeepBest:
    return KeepBest(model, None if val is None else val.images, None if val is None else val.labels)


def train_erm(
    train: ColoredSplit, val: ColoredSplit | None = None, *, config: ClassifierConfig = ClassifierConfig(), seed: int = 0,
    width: int = 16, index_pool: torch.Tensor | None = None,
) -> nn.Module:
    """Plain cross-entropy (on `index_pool` if given: JTT's up-sampled set)."""
    model = _new_model(train, seed, width)
    keep = _selector(model, val)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(train.images[idx]), train.labels[idx])

    run_epochs(step, model.parameters(), len(train), config, seed=seed, index_pool=index_pool, on_epoch=keep)
    return keep.restore()


def pseudo_groups(labels: torch.Tensor, conflicting: torch.Tensor) -> torch.Tensor:
    """Group index = 2·class + 1[predicted bias-conflicting] (class × {aligned, conflicting})."""
    return labels * 2 + conflicting.long()


def train_group_dro(
    train: ColoredSplit, groups: torch.Tensor, val: ColoredSplit | None = None, *, step_size: float = 0.01,
    reweight_groups: bool = True, config: ClassifierConfig = ClassifierConfig(), seed: int = 0, width: int = 16,
) -> nn.Module:
    """GroupDRO with exponentiated-gradient group weights (η = step_size) on the given (pseudo-)groups, with
    group-balanced sampling (`--reweight_groups`) by default."""
    num_groups = 2 * NUM_CLASSES
    if groups.numel() != len(train):
        raise ValueError(f"groups: {groups.numel()} entries for {len(train)} training samples")
    model = _new_model(train, seed, width)
    keep = _selector(model, val)
    weights = torch.full((num_groups,), 1.0 / num_groups)
    counts = torch.bincount(groups, minlength=num_groups).double()
    sample_weights = (len(train) / counts.clamp_min(1))[groups] if reweight_groups else None

    def step(idx: torch.Tensor) -> torch.Tensor:
        nonlocal weights
        losses = F.cross_entropy(model(train.images[idx]), train.labels[idx], reduction="none")
        means, _ = group_means(losses, groups[idx], num_groups)
        weights, robust = group_dro_step(weights, means, step_size)
        return robust

    run_epochs(step, model.parameters(), len(train), config, seed=seed, sample_weights=sample_weights, on_epoch=keep)
    return keep.restore()


def recipe_one(
    train: ColoredSplit, amplifier: BiasAmplifier, val: ColoredSplit | None = None, *, step_size: float = 0.01,
    threshold: float | None = None, config: ClassifierConfig = ClassifierConfig(), seed: int = 0, width: int = 16,
) -> nn.Module:
    """DDB Recipe I: pseudo-groups from the amplifier (misclassified ⇒ conflicting), then GroupDRO."""
    conflicting = amplifier.predict_conflicting(train.images, train.labels, threshold)
    groups = pseudo_groups(train.labels, conflicting)
    return train_group_dro(train, groups, val, step_size=step_size, config=config, seed=seed, width=width)


def _lff_weights(
    loss_b: torch.Tensor, loss_d: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor,
    ema_b: PerSampleEMA, ema_d: PerSampleEMA,
) -> torch.Tensor:
    """EMA per sample, class-wise max normalisation, then W = L_b/(L_b + L_d + 1e-8) (LfF train.py)."""
    lb, ld = ema_b.update(idx, loss_b), ema_d.update(idx, loss_d)
    lb = lb / ema_b.class_max()[labels]
    ld = ld / ema_d.class_max()[labels]
    return relative_difficulty(lb, ld)


def recipe_two(
    train: ColoredSplit, amplifier: BiasAmplifier, bias_images: torch.Tensor, bias_labels: torch.Tensor,
    val: ColoredSplit | None = None, *, alpha: float = 0.7, config: ClassifierConfig = ClassifierConfig(), seed: int = 0,
    width: int = 16,
) -> nn.Module:
    """DDB Recipe II: the amplifier and the target are trained together (the seed paper's Fig. 5), LfF-style.

    Each step the amplifier takes a GCE step on a batch of its own data (`bias_images`: synthetic for DDB) and
    scores the target's real batch; W = L_b/(L_b + L_d) from per-sample EMAs with class-wise max
    normalisation weights the target's CE. Training both from scratch matters: a pre-trained, frozen amplifier
    gives aligned samples W ≈ 0 from the first step, before the target has learnt anything, and the target then
    learns from the conflicting samples only (measured: aligned accuracy collapses; benchmarks/DEBIAS.md).
    """
    check_labelled_images(bias_images, bias_labels, num_classes=amplifier.num_classes)
    model = _new_model(train, seed, width)
    keep = _selector(model, val)
    ema_b, ema_d = PerSampleEMA(train.labels, alpha), PerSampleEMA(train.labels, alpha)
    model_b, gen = amplifier.model.train(), torch.Generator().manual_seed(seed + 30_000)

    def step(idx: torch.Tensor) -> torch.Tensor:
        x, y = train.images[idx], train.labels[idx]
        own = torch.randint(bias_labels.numel(), (idx.numel(),), generator=gen)
        ce_d = F.cross_entropy(model(x), y, reduction="none")
        with torch.no_grad():
            ce_b = F.cross_entropy(model_b(x), y, reduction="none")
        w = _lff_weights(ce_b, ce_d.detach(), idx, y, ema_b, ema_d)
        return amplifier.loss(model_b(bias_images[own]), bias_labels[own]) + (ce_d * w).mean()

    run_epochs(step, list(model.parameters()) + list(model_b.parameters()), len(train), config, seed=seed,
               on_epoch=keep)
    model_b.eval()
    return keep.restore()


def train_lff(
    train: ColoredSplit, val: ColoredSplit | None = None, *, q: float = 0.7, alpha: float = 0.7,
    config: ClassifierConfig = ClassifierConfig(), seed: int = 0, width: int = 16,
) -> nn.Module:
    """LfF: a GCE-trained biased model on the real data, jointly with the W-weighted debiased model."""
    model_d = _new_model(train, seed, width)
    model_b = _new_model(train, seed + 10_000, width)
    keep = _selector(model_d, val)
    ema_b, ema_d = PerSampleEMA(train.labels, alpha), PerSampleEMA(train.labels, alpha)

    def step(idx: torch.Tensor) -> torch.Tensor:
        x, y = train.images[idx], train.labels[idx]
        logit_b, logit_d = model_b(x), model_d(x)
        ce_b = F.cross_entropy(logit_b, y, reduction="none")
        ce_d = F.cross_entropy(logit_d, y, reduction="none")
        w = _lff_weights(ce_b.detach(), ce_d.detach(), idx, y, ema_b, ema_d)
        return gce_loss(logit_b, y, q).mean() + (ce_d * w).mean()

    params = list(model_d.parameters()) + list(model_b.parameters())
    run_epochs(step, params, len(train), config, seed=seed, on_epoch=keep)
    return keep.restore()


def train_jtt(
    train: ColoredSplit, val: ColoredSplit | None = None, *, first_epochs: int = 1, up_weight: int = 20,
    config: ClassifierConfig = ClassifierConfig(), seed: int = 0, width: int = 16,
) -> nn.Module:
    """JTT: ERM for `first_epochs`, error set = its training mistakes, then ERM with the errors λ_up + 1 times."""
    stage_one = train_erm(train, None, config=ClassifierConfig(first_epochs, config.batch_size, config.lr,
                                                          config.weight_decay), seed=seed, width=width)
    errors = predict_logits(stage_one, train.images).argmax(1) != train.labels
    pool = jtt_indices(errors, up_weight)
    epochs = max(1, round(config.epochs * len(train) / pool.numel()))  # same number of steps as ERM
    stage_two = ClassifierConfig(epochs, config.batch_size, config.lr, config.weight_decay)
    return train_erm(train, val, config=stage_two, seed=seed + 1, width=width, index_pool=pool)
