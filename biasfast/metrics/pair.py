"""`evaluate_pair`: the bias of two models at one checkpoint in one call (coupled sampling, then `bias_score`), for
a training loop to call at each checkpoint before `BiasTracker.update`."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from biasfast.diffusion.sampling import sample_coupled
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.metrics.bias import BiasReport, bias_score
from biasfast.metrics.search import TrainingSet


def evaluate_pair(
    model_a: Any,
    model_b: Any,
    train_a: TrainingSet,
    train_b: TrainingSet,
    schedule: NoiseSchedule,
    *,
    n: int,
    steps: int | None = None,
    method: str = "ddim",
    eta: float = 0.0,
    test: Any = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    metric: str = "pearson",
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    shape: Sequence[int] | None = None,
    progress: bool = False,
) -> BiasReport:
    """Sample n pairs from model_a and model_b with shared noise (`sample_coupled`) and score them against their
    training sets (`bias_score`, optionally in the feature space of `features`).

    Models are sampled in eval mode under no_grad, and their modes are restored. The sample shape is `shape`,
    else that of train_a's rows when it is a tensor or array, else a diffusers model's (in_channels,
    sample_size, sample_size). The samples stay on `device` (default: model_a's) for the search.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a biasfast.NoiseSchedule, got {type(schedule).__name__}")
    shape = _sample_shape(shape, train_a, model_a)
    modules = [m for m in (model_a, model_b) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        samples_a, samples_b = sample_coupled([model_a, model_b], n, shape, schedule, seed=seed, steps=steps,
                                              method=method, eta=eta, batch_size=batch_size, device=device,
                                              progress=progress)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    return bias_score(samples_a, samples_b, train_a, train_b, metric=metric, test=test, features=features)


def _sample_shape(shape: Sequence[int] | None, train_a: Any, model: Any) -> tuple[int, ...]:
    if shape is not None:
        shape = tuple(shape)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"shape: expected positive ints (C, H, W), got {shape!r}")
        return shape
    if isinstance(train_a, (torch.Tensor, np.ndarray)) and train_a.ndim >= 2:
        return tuple(int(d) for d in train_a.shape[1:])
    config = getattr(model, "config", None)
    size, channels = getattr(config, "sample_size", None), getattr(config, "in_channels", None)
    if isinstance(channels, int) and size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return channels, height, width
    raise ValueError("shape: cannot tell the sample shape from a streamed train_a or from model_a; pass shape=(C, H, W)")
