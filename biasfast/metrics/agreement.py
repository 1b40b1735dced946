"""`denoiser_agreement`: the score-level measure of the biased-generalization paper (its Fig. 2): do the two
models agree more on test inputs than on A's training inputs?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from biasfast._core.checks import check_finite, check_floating, check_tensor
from biasfast.diffusion.models import denoise
from biasfast.diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class DenoiserAgreement:
    """Mean cosine of the two models' noise predictions on noised A-training and test images.

    `difference` = test − train (as the paper's plots): positive when the models agree less on A's training
    images than on unseen ones, i.e. model A has learned something specific to its own samples.
    """

    train: float
    test: float
    difference: float
    train_per_sample: torch.Tensor
    test_per_sample: torch.Tensor
    t: int


def _cosines(model_a: Any, model_b: Any, x_t: torch.Tensor, t: int, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, x_t.shape[0], batch_size):
        batch = x_t[start : start + batch_size]
        steps = torch.full((batch.shape[0],), t, dtype=torch.long, device=batch.device)
        pred_a = denoise(model_a, batch, steps, name="model_a").flatten(1)
        pred_b = denoise(model_b, batch, steps, name="model_b").flatten(1)
        if pred_a.shape != pred_b.shape or pred_a.shape[0] != batch.shape[0]:
            raise ValueError(f"model_a and model_b: predictions of shapes {tuple(pred_a.shape)} and "
                             f"{tuple(pred_b.shape)} for a batch of {batch.shape[0]}")
        out.append(F.cosine_similarity(pred_a.double(), pred_b.double(), dim=1))
    return torch.cat(out)


def _noised(x0: torch.Tensor, alpha_bar: float, seed: int) -> torch.Tensor:
    """x_t = √ᾱ x0 + √(1 − ᾱ) ε with ε from a seeded CPU generator: the same noise on every device and run."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise.to(x0.device, x0.dtype)


def denoiser_agreement(
    model_a: Any,
    model_b: Any,
    x0_train_a: torch.Tensor,
    x0_test: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    *,
    seed: int = 0,
    batch_size: int = 256,
) -> DenoiserAgreement:
    """Cosine similarity of ε̂_A(x_t, t) and ε̂_B(x_t, t) on noised training images of A and on noised test images.

    Models are called as `model(x_t, t_batch)` (t_batch: int64 of shape (batch,); diffusers models as
    `biasfast.diffusion.models.denoise` calls them), under `torch.no_grad()` and
    in eval mode (dropout off; their previous modes are restored). Noise: seed for the training images,
    seed + 1 for the test images, so repeated calls (e.g. per checkpoint) see identical x_t.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a biasfast.NoiseSchedule, got {type(schedule).__name__}")
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t: expected one timestep, got a tensor of shape {tuple(t.shape)}")
        t = int(t.item())
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t: expected an int timestep in [0, {schedule.num_timesteps}), got {t!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    for name, x0 in (("x0_train_a", x0_train_a), ("x0_test", x0_test)):
        check_tensor(x0, name)
        check_floating(x0, name)
        if x0.dim() < 2 or x0.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty batch (n, ...), got shape {tuple(x0.shape)}")
        check_finite(x0, name)
    if x0_train_a.shape[1:] != x0_test.shape[1:]:
        raise ValueError(f"x0_test: image shape {tuple(x0_test.shape[1:])} does not match x0_train_a's "
                         f"{tuple(x0_train_a.shape[1:])}")
    alpha_bar = float(schedule.alphas_cumprod[t])
    modules = [m for m in (model_a, model_b) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            train = _cosines(model_a, model_b, _noised(x0_train_a, alpha_bar, seed), t, batch_size)
            test = _cosines(model_a, model_b, _noised(x0_test, alpha_bar, seed + 1), t, batch_size)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    train_mean, test_mean = float(train.mean()), float(test.mean())
    return DenoiserAgreement(train_mean, test_mean, test_mean - train_mean, train, test, t)
