"""DDB step 1: a class-conditional diffusion model with CFG, sampled at high guidance → bias-aligned images.

The denoiser is trained by biasfast.diffusion.training.Trainer (fused SNR-weighted loss) with label dropout to the null
class (p = 0.1) and EMA weights, stopped when the held-out denoising loss stops falling, and sampled by biasfast.sample
through the fused CFG step. Images are mapped [0, 1] ↔ [−1, 1].

Sampling clips the guided x̂0 to [−1, 1] and re-derives ε̂ from the clipped x̂0 (`use_clipped_model_output`, as
guided-diffusion's DDIM does). Without the re-derivation the colour alignment of the samples *falls* as guidance
rises (99.7 % at scale 2 → 21 % at 15 for a 4000-step EMA generator, 10 DDIM steps; benchmarks/DEBIAS.md): the
clipped x̂0 is paired with the unclipped guided ε̂, so at high noise x̂0 saturates to the corners of the RGB cube and
those off-palette colours are kept. With it alignment rises and stays ≥ 97 % up to scale 15.
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
from biasfast.diffusion.training import DenoisingEval


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings. guidance_scale uses diffusers' convention s = 1 + w (Ho & Salimans' w)."""

    per_class: int = 400
    guidance_scale: float = 2.0
    label_dropout: float = 0.1
    model: str = "unet"
    model_options: tuple[tuple[str, object], ...] = (("base_channels", 16),)
    train_steps: int = 7000  # at most; the held-out rule (eval_every, patience) stops it first
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.995
    eval_every: int = 250
    patience: int = 3  # stop after this many held-out evaluations without a relative gain of min_improvement
    min_improvement: float = 0.01
    schedule: str = "linear"
    num_timesteps: int = 1000
    sampling_steps: int = 50
    eta: float = 1.0
    clip_sample: float = 1.0
    use_clipped_model_output: bool = True
    sampling_batch: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.guidance_scale > 0:
            raise ValueError(f"guidance_scale: must be > 0, got {self.guidance_scale}")
        if not isinstance(self.per_class, int) or self.per_class < 1:
            raise ValueError(f"per_class: expected a positive int, got {self.per_class!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout: expected a probability in [0, 1), got {self.label_dropout}")
        if min(self.train_steps, self.sampling_steps, self.sampling_batch, self.eval_every, self.patience) < 1:
            raise ValueError("train_steps, sampling_steps, sampling_batch, eval_every, patience: must be >= 1, got "
                             f"{self.train_steps}, {self.sampling_steps}, {self.sampling_batch}, {self.eval_every}, "
                             f"{self.patience}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta: expected a number in [0, 1], got {self.eta}")

    @classmethod
    def quick(cls) -> "SyntheticConfig":
        return cls(per_class=100, train_steps=1000, sampling_steps=25)

    def with_overrides(self, **overrides) -> "SyntheticConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


class HeldOutLoss:
    """Mean of the conditional and unconditional held-out denoising losses (both branches feed CFG)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule) -> None:
        check_labelled_images(images, labels)
        self.conditional = DenoisingEval(images * 2 - 1, schedule, labels=labels)
        self.unconditional = DenoisingEval(images * 2 - 1, schedule)

    def __call__(self, model: torch.nn.Module) -> float:
        return (self.conditional(model)[0] + self.unconditional(model)[0]) / 2


def new_generator(config: SyntheticConfig, image_shape: tuple[int, ...], seed: int
                  ) -> tuple[torch.nn.Module, NoiseSchedule]:
    """The untrained class-conditional denoiser (null class = NUM_CLASSES) for images of `image_shape`, and its
    schedule: what training starts from and what cached weights are loaded into."""
    from biasfast.diffusion.models import build_model

    model = build_model(config.model, in_channels=image_shape[0], image_size=image_shape[-1], seed=seed,
                        num_classes=NUM_CLASSES, **dict(config.model_options))
    return model, NoiseSchedule(config.schedule, config.num_timesteps)


def train_conditional_diffusion(
    images: torch.Tensor, labels: torch.Tensor, config: SyntheticConfig, *, seed: int = 0,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None, log: Callable[[str], None] | None = None,
) -> tuple[torch.nn.Module, NoiseSchedule]:
    """Train a class-conditional denoiser (null class = NUM_CLASSES) on images in [0, 1]; returns the EMA weights.

    With `heldout` (images, labels), training stops early once the EMA model's held-out loss (`HeldOutLoss`, every
    `eval_every` steps) has not improved by `min_improvement` (relative) for `patience` evaluations."""
    from biasfast.diffusion.training import TrainConfig, Trainer

    check_labelled_images(images, labels)
    if images.dim() != 4:
        raise ValueError(f"images: expected (n, C, H, W), got {tuple(images.shape)}")
    model, schedule = new_generator(config, tuple(images.shape[1:]), seed)
    trainer = Trainer(model, images * 2 - 1, schedule,
                      TrainConfig(batch_size=config.batch_size, lr=config.lr, label_dropout=config.label_dropout,
                                  ema_decay=config.ema_decay, seed=seed),
                      labels=labels)
    evaluate = None if heldout is None else HeldOutLoss(*heldout, schedule)
    best, stale, start = float("inf"), 0, time.perf_counter()
    for step in range(1, config.train_steps + 1):
        loss = trainer.train_step()
        if step % config.eval_every and step != config.train_steps:
            continue
        message = f"  diffusion step {step}/{config.train_steps} loss {loss:.4f}"
        if evaluate is not None:
            current = evaluate(trainer.eval_model)
            stale = 0 if current < best * (1 - config.min_improvement) else stale + 1
            best = min(best, current)
            message += f" held-out {current:.4f}"
        if log is not None:
            log(f"{message} ({time.perf_counter() - start:.0f}s)")
        if stale >= config.patience:
            if log is not None:
                log(f"  diffusion: held-out loss converged at step {step} (best {best:.4f})")
            break
    return trainer.eval_model.eval(), schedule


@torch.no_grad()
def generate(
    model: torch.nn.Module, schedule: NoiseSchedule, image_shape: tuple[int, ...], config: SyntheticConfig, *,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class images of every class with CFG at config.guidance_scale (fused CFG step) → images in [0, 1]."""

    labels = torch.arange(NUM_CLASSES).repeat_interleave(config.per_class)
    x = sample(model, (labels.numel(), *image_shape), schedule, steps=config.sampling_steps, eta=config.eta,
               guidance_scale=config.guidance_scale, class_labels=labels, null_label=NUM_CLASSES,
               clip_sample=config.clip_sample, use_clipped_model_output=config.use_clipped_model_output, seed=seed,
               batch_size=config.sampling_batch, progress=config.progress)
    return ((x.clamp(-1, 1) + 1) / 2).float(), labels


class DiffusionSource:
    """The benchmark's synthetic source: trains a generator on data.train and samples it (per ratio and seed).

    With `cache_dir`, the synthetic images of each (ratio, seed, generator config) and the trained generator of
    each (ratio, seed, training config) are saved there and reused by later runs (the generator is the most
    expensive step of the benchmark)."""

    def __init__(
        self, config: SyntheticConfig = SyntheticConfig(), log: Callable[[str], None] = print,
        cache_dir: Path | None = None,
    ) -> None:
        self.config, self.log, self.cache_dir = config, log, cache_dir

    @property
    def description(self) -> str:
        c = self.config
        return (f"DDB generator: class-conditional {c.model} denoiser {dict(c.model_options)}, at most {c.train_steps} "
                f"steps, stopped when the held-out loss (every {c.eval_every}) gains < {c.min_improvement:.0%} for "
                f"{c.patience} checks (batch {c.batch_size}, lr {c.lr}, EMA {c.ema_decay}, label dropout "
                f"{c.label_dropout}, {c.schedule} schedule, T = {c.num_timesteps}), {c.per_class} images per class, "
                f"DDIM {c.sampling_steps} steps, eta {c.eta}, x0 clipped to ±{c.clip_sample}"
                f"{' with ε re-derived' if c.use_clipped_model_output else ''}, guidance scale {c.guidance_scale} "
                "(diffusers convention).")

    def variant(self, **overrides) -> "DiffusionSource":
        """The same source with other settings (an ablation); it shares the cache, so a variant that only samples
        differently reuses the trained generator."""
        return DiffusionSource(self.config.with_overrides(**overrides), self.log, self.cache_dir)

    def _cached(self, kind: str, config: SyntheticConfig, data: ColoredDigits, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(repr((config, data.ratio, data.seed, seed,
                                   tuple(data.train.images.shape))).encode()).hexdigest()[:16]
        return Path(self.cache_dir) / f"{kind}-r{data.ratio}-s{seed}-{key}.pt"

    def cache_path(self, data: ColoredDigits, seed: int) -> Path | None:
        return self._cached("synthetic", replace(self.config, progress=False), data, seed)

    def generator_path(self, data: ColoredDigits, seed: int) -> Path | None:
        """Keyed by the training settings only: sampling settings (guidance, set size, sampler) do not change it."""
        training = replace(self.config, per_class=1, guidance_scale=1.0, sampling_steps=1, eta=0.0,
                           clip_sample=1.0, use_clipped_model_output=False, sampling_batch=1, progress=False)
        return self._cached("generator", training, data, seed)

    def generator(self, data: ColoredDigits, seed: int) -> tuple[torch.nn.Module, NoiseSchedule]:
        """The EMA generator trained on data.train (stopped on data.val), from the cache when it is there."""
        path = self.generator_path(data, seed)
        if path is not None and path.exists():
            model, schedule = new_generator(self.config, tuple(data.train.images.shape[1:]), seed)
            model.load_state_dict(load_checkpoint(str(path)))
            self.log(f"  generator: from {path}")
            return model.eval(), schedule
        model, schedule = train_conditional_diffusion(data.train.images, data.train.labels, self.config, seed=seed,
                                                      heldout=(data.val.images, data.val.labels), log=self.log)
        if path is not None:
            save_atomic(model.state_dict(), str(path))
        return model, schedule

    def __call__(self, data: ColoredDigits, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.cache_path(data, seed)
        if path is not None and path.exists():
            images, labels = load_checkpoint(str(path))
            self.log(f"  synthetic: {labels.numel()} images from {path}")
            return images, labels
        start = time.perf_counter()
        model, schedule = self.generator(data, seed)
        images, labels = generate(model, schedule, tuple(data.train.images.shape[1:]), self.config, seed=seed)
        self.log(f"  synthetic: {labels.numel()} images in {time.perf_counter() - start:.0f}s")
        if path is not None:
            save_atomic((images, labels), str(path))
        return images, labels
