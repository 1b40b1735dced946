"""DDB step 1: a class-conditional diffusion model with CFG, sampled at high guidance → bias-aligned images.

The denoiser is trained by biasfast.diffusion.training.Trainer (fused SNR-weighted loss) with label dropout to the null
class (p = 0.1), and sampled by biasfast.sample through the fused CFG step. Images are mapped [0, 1] ↔ [−1, 1].
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from biasfast.data.colored_digits import NUM_CLASSES, ColoredDigits, check_labelled_images
from biasfast._core.io import load_checkpoint, save_atomic
from biasfast.diffusion.sampling import sample
from biasfast.diffusion.schedules import NoiseSchedule


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings. guidance_scale uses diffusers' convention s = 1 + w (Ho & Salimans' w)."""

    per_class: int = 400
    guidance_scale: float = 2.0
    label_dropout: float = 0.1
    model: str = "unet"
    model_options: tuple[tuple[str, object], ...] = (("base_channels", 16),)
    train_steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "linear"
    num_timesteps: int = 1000
    sampling_steps: int = 10
    sampling_batch: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.guidance_scale > 0:
            raise ValueError(f"guidance_scale: must be > 0, got {self.guidance_scale}")
        if not isinstance(self.per_class, int) or self.per_class < 1:
            raise ValueError(f"per_class: expected a positive int, got {self.per_class!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout: expected a probability in [0, 1), got {self.label_dropout}")
        if self.train_steps < 1 or self.sampling_steps < 1 or self.sampling_batch < 1:
            raise ValueError("train_steps, sampling_steps, sampling_batch: must be >= 1, got "
                             f"{self.train_steps}, {self.sampling_steps}, {self.sampling_batch}")

    @classmethod
    def quick(cls) -> "SyntheticConfig":
        return cls(per_class=100, train_steps=400, sampling_steps=10)

    def with_overrides(self, **overrides) -> "SyntheticConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def train_conditional_diffusion(
    images: torch.Tensor, labels: torch.Tensor, config: SyntheticConfig, *, seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.nn.Module, NoiseSchedule]:
    """Train a class-conditional denoiser (null class = NUM_CLASSES) on images in [0, 1]."""
    from biasfast.diffusion.models import build_model
    from biasfast.diffusion.training import TrainConfig, Trainer

    check_labelled_images(images, labels)
    if images.dim() != 4:
        raise ValueError(f"images: expected (n, C, H, W), got {tuple(images.shape)}")
    schedule = NoiseSchedule(config.schedule, config.num_timesteps)
    model = build_model(config.model, in_channels=images.shape[1], image_size=images.shape[-1], seed=seed,
                        num_classes=NUM_CLASSES, **dict(config.model_options))
    trainer = Trainer(model, images * 2 - 1, schedule,
                      TrainConfig(batch_size=config.batch_size, lr=config.lr, label_dropout=config.label_dropout,
                                  seed=seed),
                      labels=labels)
    start = time.perf_counter()
    for step in range(config.train_steps):
        loss = trainer.train_step()
        if log is not None and (step + 1) % max(1, config.train_steps // 5) == 0:
            log(f"  diffusion step {step + 1}/{config.train_steps} loss {loss:.4f} ({time.perf_counter() - start:.0f}s)")
    return trainer.eval_model.eval(), schedule


@torch.no_grad()
def generate(
    model: torch.nn.Module, schedule: NoiseSchedule, image_shape: tuple[int, ...], config: SyntheticConfig, *,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class images of every class with CFG at config.guidance_scale (fused CFG step) → images in [0, 1]."""

    labels = torch.arange(NUM_CLASSES).repeat_interleave(config.per_class)
    x = sample(model, (labels.numel(), *image_shape), schedule, steps=config.sampling_steps,
                        guidance_scale=config.guidance_scale, class_labels=labels, null_label=NUM_CLASSES,
                        clip_sample=1.0, seed=seed, batch_size=config.sampling_batch,
                        progress=config.progress)
    return ((x.clamp(-1, 1) + 1) / 2).float(), labels


class DiffusionSource:
    """The benchmark's synthetic source: trains a generator on data.train and samples it (per ratio and seed).

    With `cache_dir`, the synthetic images of each (ratio, seed, generator config) are saved there and reused by
    later runs (the generator is the most expensive step of the benchmark)."""

    def __init__(
        self, config: SyntheticConfig = SyntheticConfig(), log: Callable[[str], None] = print,
        cache_dir: Path | None = None,
    ) -> None:
        self.config, self.log, self.cache_dir = config, log, cache_dir

    @property
    def description(self) -> str:
        c = self.config
        return (f"DDB generator: class-conditional {c.model} denoiser {dict(c.model_options)}, {c.train_steps} steps "
                f"(batch {c.batch_size}, lr {c.lr}, label dropout {c.label_dropout}, {c.schedule} schedule, "
                f"T = {c.num_timesteps}), {c.per_class} images per class, DDIM {c.sampling_steps} steps at "
                f"guidance scale {c.guidance_scale} (diffusers convention).")

    def cache_path(self, data: ColoredDigits, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(repr((replace(self.config, progress=False), data.ratio, data.seed, seed,
                                   tuple(data.train.images.shape))).encode()).hexdigest()[:16]
        return Path(self.cache_dir) / f"synthetic-r{data.ratio}-s{seed}-{key}.pt"

    def __call__(self, data: ColoredDigits, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.cache_path(data, seed)
        if path is not None and path.exists():
            images, labels = load_checkpoint(str(path))
            self.log(f"  synthetic: {labels.numel()} images from {path}")
            return images, labels
        start = time.perf_counter()
        model, schedule = train_conditional_diffusion(data.train.images, data.train.labels, self.config, seed=seed,
                                                      log=self.log)
        images, labels = generate(model, schedule, tuple(data.train.images.shape[1:]), self.config, seed=seed)
        self.log(f"  synthetic: {labels.numel()} images in {time.perf_counter() - start:.0f}s")
        if path is not None:
            save_atomic((images, labels), str(path))
        return images, labels
