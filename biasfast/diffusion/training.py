"""Denoiser training with the fused SNR-weighted loss, resumable to the bit after a SIGKILL.

Randomness is counter-based: the batch order of epoch e and the timesteps/noise of step s come from generators
seeded by (seed, stream, e or s) alone. A resumed trainer therefore needs only its step count, weights,
optimizer and EMA state to continue exactly where an uninterrupted run would be; no global RNG is touched.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from biasfast._core.constants import PREDICTIONS
from biasfast._core.seeds import generator_for
from biasfast.diffusion.losses import HybridLoss
from biasfast.diffusion.models import denoise, drop_labels, label_classes
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.diffusion.weighting import weighting
from biasfast.ops.snr_loss import snr_weighted_loss


# "mse": the weighted ε/x0/v regression (`biasfast.snr_weighted_loss`); "hybrid": guided-diffusion's learned-variance
# loss (`biasfast.nn.HybridLoss`: the weighted MSE plus the unweighted L_vlb on 2C output channels), as the released
# Unmasking Bias code trains.
LOSSES = ("mse", "hybrid")


@dataclass
class TrainConfig:
    """Optimisation settings; `weighting`/`weighting_params` go to `biasfast.weighting`, `loss` is one of LOSSES
    (with "hybrid" the model must output 2C channels: the prediction, then the variance interpolation v)."""

    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    weighting: str = "constant"
    weighting_params: dict = field(default_factory=dict)
    prediction: str = "epsilon"
    loss: str = "mse"
    ema_decay: float | None = None
    ema_warmup: bool = False
    label_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: unknown {self.prediction!r}; expected one of {PREDICTIONS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: unknown {self.loss!r}; expected one of {LOSSES}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a value in (0, 1) or None, got {self.ema_decay!r}")
        if self.ema_warmup and self.ema_decay is None:
            raise ValueError("ema_warmup: needs ema_decay (there is no EMA to warm up)")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout: expected a probability in [0, 1], got {self.label_dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """The EMA decay of the update after `update` earlier ones. With `warmup`, diffusers' EMAModel default:
    min(decay, (1 + k)/(10 + k)) and a plain copy at the first update, so short runs are not dominated by the
    initial weights (after k plain updates they still carry decay^k of them: 5% after 3000 at 0.999)."""
    if not warmup:
        return decay
    return 0.0 if update == 0 else min(decay, (1 + update) / (10 + update))


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str
                     ) -> torch.Tensor:
    """What the network regresses: ε, x0 or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0."""
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


class Trainer:
    """Trains one denoiser `model(x, t, class_labels=None)` (or a diffusers model) on `images` (N, C, H, W).

    With `labels` and a class-conditional model (`num_classes`; diffusers: `num_class_embeds` = classes + 1, see
    `models.label_classes`), labels are dropped to the null class with probability
    `config.label_dropout` (classifier-free guidance training).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, schedule: NoiseSchedule, config: TrainConfig, *,
                 labels: torch.Tensor | None = None, device: str | torch.device = "cpu") -> None:
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.images = images.to(self.device, torch.float32)
        self.labels = None if labels is None else labels.to(self.device, torch.long)
        self.num_classes = label_classes(model)
        if self.labels is not None and not self.num_classes:
            raise ValueError("labels: the model was built without num_classes (diffusers: num_class_embeds)")
        if self.labels is not None and not bool(((self.labels >= 0) & (self.labels < self.num_classes)).all()):
            raise ValueError(f"labels: expected class indices in [0, {self.num_classes}) (index {self.num_classes} "
                             f"is the model's null class), got [{int(self.labels.min())}, {int(self.labels.max())}]")
        self.schedule = schedule
        self.config = config
        self.weights = weighting(config.weighting, schedule, config.prediction,
                                 **config.weighting_params).to(self.device, torch.float32)
        self.hybrid = None
        if config.loss == "hybrid":
            self.hybrid = HybridLoss(schedule, config.weighting, config.prediction,
                                     **config.weighting_params).to(self.device)
        self.alpha_bar = schedule.table(self.device, torch.float32)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.step = 0
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def eval_model(self) -> nn.Module:
        """The EMA weights when EMA is on, else the trained weights."""
        return self.ema if self.ema is not None else self.model

    def _batch_indices(self, step: int) -> torch.Tensor:
        """Indices of batch `step`: consecutive slices of per-epoch permutations, wrapping across epochs."""
        n, size = self.images.shape[0], self.config.batch_size
        position, last = step * size, (step + 1) * size
        chunks = []
        while position < last:
            epoch, start = divmod(position, n)
            if epoch != self._order_epoch:
                generator = generator_for(self.config.seed, "order", epoch)
                self._order, self._order_epoch = torch.randperm(n, generator=generator), epoch
            stop = min(n, start + last - position)
            chunks.append(self._order[start:stop])
            position += stop - start
        return torch.cat(chunks).to(self.device)

    def train_step(self) -> float:
        """One AdamW step on the SNR-weighted denoising loss (or the hybrid loss); returns the loss."""
        index = self._batch_indices(self.step)
        x0 = self.images[index]
        generator = generator_for(self.config.seed, "step", self.step)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        labels = None
        if self.labels is not None:
            labels = drop_labels(self.labels[index].cpu(), self.config.label_dropout, self.num_classes,
                                 generator).to(self.device)
        alpha_bar = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        self.model.train()
        pred = denoise(self.model, x_t, t, labels)
        if self.hybrid is not None:  # forms x_t itself from (x0, noise, t): the same x_t as above
            loss = self.hybrid(pred, x0, noise, t)
        else:
            target = diffusion_target(x0, noise, alpha_bar, self.config.prediction)
            loss = snr_weighted_loss(pred, target, t, self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            weight = 1.0 - ema_decay_at(self.step, self.config.ema_decay, self.config.ema_warmup)
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, weight)
        self.step += 1
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("checkpoint: EMA setting differs from this trainer's config")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])


class DenoisingEval:
    """Test loss with fixed evaluation noise: ε-MSE (unweighted) averaged over all timesteps.

    Timesteps are stratified: `bins` equal-width bins over [0, T), and each (image, bin) gets one fixed
    timestep inside the bin and one fixed noise draw, so successive checkpoints see the same inputs and the
    curve is smooth. The mean over bins estimates the average over all T timesteps. With `labels` the model is
    called class-conditionally (`model(x_t, t, labels)`): the held-out loss of a class-conditional denoiser.
    With `learned_variance` the model outputs 2C channels and the loss is that of the first C (the prediction),
    so MSE- and hybrid-trained models are scored alike.
    """

    def __init__(self, images: torch.Tensor, schedule: NoiseSchedule, *, bins: int = 10, seed: int = 0,
                 batch_size: int = 1024, prediction: str = "epsilon", labels: torch.Tensor | None = None,
                 learned_variance: bool = False) -> None:
        n, T = images.shape[0], schedule.num_timesteps
        if labels is not None and labels.shape != (n,):
            raise ValueError(f"labels: expected shape ({n},), got {tuple(labels.shape)}")
        if not 1 <= bins <= T:
            raise ValueError(f"bins: expected an int in [1, {T}], got {bins!r}")
        generator = generator_for(seed, "eval", 0)
        edges = torch.linspace(0, T, bins + 1).round().to(torch.int64)
        offsets = torch.rand(n, bins, generator=generator)
        width = (edges[1:] - edges[:-1]).to(torch.float64)
        t = (edges[:-1] + (offsets * width).floor().to(torch.int64)).clamp(max=T - 1)
        self.images, self.schedule, self.bins, self.edges = images, schedule, bins, edges
        self.t = t.reshape(-1)  # (n * bins,), row-major: image i, bin k
        self.noise = torch.randn((n * bins, *images.shape[1:]), generator=generator)
        self.batch_size, self.prediction, self.learned_variance = batch_size, prediction, learned_variance
        self.labels = None if labels is None else labels.long().repeat_interleave(bins)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[float, list[float]]:
        """(test loss, loss per timestep bin) of `model`."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        n = self.images.shape[0]
        x0_all = self.images.repeat_interleave(self.bins, dim=0)
        losses = torch.empty(n * self.bins, dtype=torch.float64)
        alpha_table = self.schedule.table(device, torch.float32)
        for start in range(0, n * self.bins, self.batch_size):
            stop = min(n * self.bins, start + self.batch_size)
            x0 = x0_all[start:stop].to(device)
            noise = self.noise[start:stop].to(device)
            t = self.t[start:stop].to(device)
            alpha_bar = alpha_table[t].view(-1, 1, 1, 1)
            x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
            target = diffusion_target(x0, noise, alpha_bar, self.prediction)
            labels = None if self.labels is None else self.labels[start:stop].to(device)
            pred = denoise(model, x_t, t, labels)
            if self.learned_variance:
                pred = pred[:, :x0.shape[1]]
            losses[start:stop] = (pred - target).square().flatten(1).mean(1).double().cpu()
        model.train(was_training)
        per_bin = losses.view(n, self.bins).mean(0)
        return float(per_bin.mean()), per_bin.tolist()


def log_spaced_steps(total: int, count: int, first: int = 1) -> list[int]:
    """About `count` distinct integer steps from `first` to `total`, evenly spaced in log(step)."""
    if total < 1 or count < 1:
        raise ValueError(f"steps: expected total ≥ 1 and count ≥ 1, got {total}, {count}")
    first = min(max(1, first), total)
    grid = torch.logspace(torch.log10(torch.tensor(float(first))), torch.log10(torch.tensor(float(total))), count,
                          dtype=torch.float64)
    return sorted({int(round(float(s))) for s in grid} | {total})
