"""Small CNN classifiers and the minibatch loop every recipe shares (CPU-fast on 8×8 images)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-conv-pool-conv → 4×4 pooled features → linear. ~25k parameters at width 16."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@dataclass(frozen=True)
class ClassifierConfig:
    """Optimiser and schedule for one classifier (Adam, as LfF/JTT use)."""

    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"ClassifierConfig: epochs, batch_size >= 1, lr > 0, weight_decay >= 0 required, got {self}")


Step = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of training-sample indices to the scalar loss to minimise."""


def run_epochs(
    step: Step,
    params: Iterable[torch.nn.Parameter],
    n: int,
    config: ClassifierConfig,
    *,
    seed: int,
    sample_weights: torch.Tensor | None = None,
    index_pool: torch.Tensor | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """Adam over `config.epochs` passes of n samples: shuffled, drawn from `index_pool` (JTT up-sampling)
    or drawn with replacement ∝ `sample_weights` (GroupDRO `--reweight_groups`)."""
    opt = torch.optim.Adam(list(params), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(n) if index_pool is None else index_pool
    for epoch in range(config.epochs):
        if sample_weights is not None:
            order = torch.multinomial(sample_weights, pool.numel(), replacement=True, generator=gen)
        else:
            order = pool[torch.randperm(pool.numel(), generator=gen)]
        for start in range(0, order.numel(), config.batch_size):
            loss = step(order[start : start + config.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    model.train(was_training)
    return out


class KeepBest:
    """Model selection on a labelled validation split: keeps the weights of the epoch with the best accuracy."""

    def __init__(self, model: nn.Module, images: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.best_acc, self.best_state = -1.0, None

    def __call__(self, epoch: int) -> None:
        if self.images is None:
            return
        acc = (predict_logits(self.model, self.images).argmax(1) == self.labels).float().mean().item()
        if acc > self.best_acc:
            self.best_acc, self.best_state = acc, copy.deepcopy(self.model.state_dict())

    def restore(self) -> nn.Module:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.model
