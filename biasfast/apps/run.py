"""The main job: train one denoiser on each of two disjoint halves A and B and track their bias over training.

At every log-spaced checkpoint both models are evaluated on the held-out test set (fixed evaluation noise),
sampled from identical noise (`biasfast.sample_coupled`), and scored (`biasfast.bias_score`); the reports feed
a `BiasTracker`. Checkpoints hold everything needed to resume after a SIGKILL with a bit-identical result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from biasfast._core.checks import check_device
from biasfast.data import load_images, split_disjoint
from biasfast.diffusion.models import MODEL_KINDS, build_model
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast._core.io import (CorruptCheckpointError, load_checkpoint, remove_stale_temporaries, save_atomic,
                               write_json_atomic)
from biasfast.diffusion.sampling import sample_coupled
from biasfast.metrics.bias import bias_score
from biasfast.diffusion.training import LOSSES, DenoisingEval, TrainConfig, Trainer, log_spaced_steps

CONFIG_FILE, REPORT_FILE, CURVES_FILE = "config.json", "report.json", "curves.png"
CHECKPOINT_DIR, SAMPLE_DIR = "checkpoints", "samples"
CHECKPOINT_NAME = re.compile(r"step_\d{8}\.pt")  # never the ".step_*.tmp" of an interrupted write
OUTPUTS = (CONFIG_FILE, REPORT_FILE, CURVES_FILE, "tracker.json", CHECKPOINT_DIR, SAMPLE_DIR)


@dataclass
class RunConfig:
    """Everything that determines a run's result (the resume check compares all of it).

    Defaults (tuning runs in benchmarks/RESULTS.md, "Main job"): on the embedded digits an MLP trained on 128
    images per set keeps a bias score of ~0 for the first ~100 steps, then drifts towards its own set (score
    clearly above 0 from a few hundred steps) while the test loss still falls; it costs a fraction of the
    U-Net's time per step on a CPU (`model="unet"` is the choice for larger images). The first checkpoint is
    at step 15: before that both models are still at their shared initialisation and the pair distance is
    trivially ~0.

    `loss="hybrid"` trains learned-variance models (2C outputs) with the hybrid loss; their DDPM samples use
    the learned variance, DDIM and DPM-Solver++ the prediction channels. `weight_mean` rescales the weight
    table to that mean (None: the scheme as published). A config stored before these fields existed reads back
    with their defaults, which is what such a run did.
    """

    data: str | None = None
    image_size: int | None = None
    channels: int | None = None
    n_train: int = 128
    n_test: int = 512
    model: str = "mlp"
    width: int = 256
    schedule: str = "linear"
    num_timesteps: int = 1000
    weighting: str = "constant"
    weight_mean: float | None = None
    loss: str = "mse"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float | None = None
    ema_warmup: bool = False
    checkpoints: int = 12
    first_checkpoint: int = 15
    n_samples: int = 512
    sample_steps: int = 50
    sample_eta: float = 1.0
    eval_bins: int = 10
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: unknown {self.model!r}; expected one of {MODEL_KINDS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: unknown {self.loss!r}; expected one of {LOSSES}")
        for name in ("n_train", "n_test", "width", "steps", "batch_size", "checkpoints", "n_samples",
                     "sample_steps", "eval_bins", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def variance(self) -> str:
        """The DDPM sampler's variance for this run's models."""
        return "learned_range" if self.loss == "hybrid" else "fixed_small"


QUICK = dict(n_train=64, n_test=128, width=64, steps=60, batch_size=32, checkpoints=3, first_checkpoint=10,
             n_samples=64, sample_steps=10, eval_bins=4)


def prepare_output(out: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless `overwrite`; with it, remove only this job's own outputs."""
    if resume:
        if not os.path.isfile(os.path.join(out, CONFIG_FILE)):
            raise ValueError(f"resume: {out!r} holds no biasfast run ({CONFIG_FILE} missing)")
        return
    existing = [name for name in OUTPUTS if os.path.exists(os.path.join(out, name))]
    if existing and not overwrite:
        raise FileExistsError(f"out: {out!r} already holds a run ({', '.join(existing)}); pass --overwrite to "
                              f"replace it or --resume {out} to continue it")
    for name in existing:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    os.makedirs(out, exist_ok=True)


def check_resume_config(stored: dict, given: dict) -> None:
    """Options given explicitly on resume must equal those the run was started with (fields the stored config
    predates count as their defaults)."""
    stored = RunConfig.from_dict(stored).to_dict()
    differ = [f"{k}: run has {stored.get(k)!r}, given {v!r}" for k, v in given.items() if stored.get(k) != v]
    if differ:
        raise ValueError("resume: the run directory was made with a different configuration (" + "; ".join(differ)
                         + ")")


class Experiment:
    """One A/B run in `out`; `run()` trains to the end (resuming from the last checkpoint) and writes reports."""

    def __init__(self, config: RunConfig, out: str, *, device: str = "cpu", progress: bool = True) -> None:
        self.config, self.out, self.progress = config, out, progress
        self.device = check_device(device, "device")
        # One intra-op thread: these small models gain little from more, results do not depend on the core
        # count, and a busy machine does not stall OpenMP barriers.
        torch.set_num_threads(config.threads)
        source = load_images(config.data, image_size=config.image_size, channels=config.channels)
        self.split = split_disjoint(source, config.n_train, config.n_test, seed=config.seed)
        self.image_shape = tuple(self.split.train_a.shape[1:])
        self.schedule = NoiseSchedule(config.schedule, config.num_timesteps)
        params = {} if config.weight_mean is None else {"mean": config.weight_mean}
        train_config = TrainConfig(batch_size=config.batch_size, lr=config.lr, weighting=config.weighting,
                                   weighting_params=params, loss=config.loss, ema_decay=config.ema_decay,
                                   ema_warmup=config.ema_warmup, seed=config.seed)
        channels, size = self.image_shape[0], self.image_shape[-1]
        kwargs = {"base_channels": config.width} if config.model == "unet" else {"hidden": config.width}
        learned = config.loss == "hybrid"
        self.trainers = [
            Trainer(build_model(config.model, in_channels=channels, image_size=size, seed=config.seed,
                                out_channels=2 * channels if learned else None, **kwargs),
                    images, self.schedule, train_config, device=self.device)
            for images in (self.split.train_a, self.split.train_b)
        ]
        self.evaluate_loss = DenoisingEval(self.split.test, self.schedule, bins=config.eval_bins, seed=config.seed,
                                           learned_variance=learned)
        self.schedule_steps = log_spaced_steps(config.steps, config.checkpoints, config.first_checkpoint)
        self.history: list[dict] = []

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint_path(self, step: int) -> str:
        return os.path.join(self.out, CHECKPOINT_DIR, f"step_{step:08d}.pt")

    def _save(self, step: int) -> None:
        save_atomic({"format": 1, "config": self.config.to_dict(), "step": step, "history": self.history,
                     "trainers": [t.state_dict() for t in self.trainers]}, self._checkpoint_path(step))

    def _restore_last(self) -> None:
        """Continue from the newest readable checkpoint; an unreadable one is reported by name and skipped (its
        steps are trained again, with the same result)."""
        folder = os.path.join(self.out, CHECKPOINT_DIR)
        for stale in (folder, os.path.join(self.out, SAMPLE_DIR)):
            remove_stale_temporaries(stale)
        names = sorted(n for n in os.listdir(folder) if CHECKPOINT_NAME.fullmatch(n)) if os.path.isdir(folder) else []
        state = None
        for name in reversed(names):
            try:
                state = load_checkpoint(os.path.join(folder, name))
                break
            except CorruptCheckpointError as exc:
                warnings.warn(f"resume: {exc}; continuing from the checkpoint before it", stacklevel=2)
        if state is None:
            return
        if RunConfig.from_dict(state["config"]) != self.config:
            raise ValueError(f"resume: checkpoint {name} was written by a different configuration")
        for trainer, trainer_state in zip(self.trainers, state["trainers"]):
            trainer.load_state_dict(trainer_state)
        self.history = list(state["history"])

    def final_models(self) -> list[torch.nn.Module]:
        """Models A and B (their evaluation weights) as of the last checkpoint, in eval mode, for re-sampling."""
        self._restore_last()
        models = [t.eval_model for t in self.trainers]
        for m in models:
            m.eval()
        return models

    # -- evaluation --------------------------------------------------------------------------------------------
    def _sample_path(self, step: int, ext: str) -> str:
        return os.path.join(self.out, SAMPLE_DIR, f"step_{step:08d}.{ext}")

    def _evaluate(self, step: int, train_loss: float) -> dict:
        models = [t.eval_model for t in self.trainers]
        losses = [self.evaluate_loss(m) for m in models]
        for m in models:
            m.eval()
        samples = sample_coupled(models, self.config.n_samples, self.image_shape, self.schedule,
                                 seed=self.config.seed, steps=self.config.sample_steps, method="ddim",
                                 eta=self.config.sample_eta, variance=self.config.variance, progress=False)
        samples = [s.detach().cpu() for s in samples]
        save_atomic({"samples_a": samples[0], "samples_b": samples[1]}, self._sample_path(step, "pt"))
        save_sample_grid(samples[0], samples[1], self._sample_path(step, "png"))
        return {"step": step, "train_loss": train_loss,
                "test_loss": (losses[0][0] + losses[1][0]) / 2, "test_loss_a": losses[0][0],
                "test_loss_b": losses[1][0], "loss_bins_a": losses[0][1], "loss_bins_b": losses[1][1]}

    def _score(self, step: int):
        samples = load_checkpoint(self._sample_path(step, "pt"))
        return bias_score(samples["samples_a"], samples["samples_b"], self.split.train_a,
                                   self.split.train_b, metric="pearson", test=self.split.test)

    # -- the job -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._restore_last()
        start = self.trainers[0].step
        bar = tqdm(total=self.config.steps, initial=start, desc="training A and B", unit="step",
                   disable=not self.progress)
        running = []
        for target in self.schedule_steps:
            if target <= start:
                continue
            while self.trainers[0].step < target:
                losses = [t.train_step() for t in self.trainers]
                running.append(sum(losses) / 2)
                bar.update(1)
                bar.set_postfix(loss=f"{running[-1]:.4f}", refresh=False)
            train_loss = sum(running) / len(running)
            running = []
            self.history.append(self._evaluate(target, train_loss))
            self._save(target)
        bar.close()
        return self._report()

    def _report(self) -> dict:
        from biasfast.metrics.tracker import BiasTracker

        tracker = BiasTracker()
        records, final = [], None
        for record in self.history:
            report = final = self._score(record["step"])
            tracker.update(record["step"], report, record["test_loss"])
            records.append({**record, "bias": report.to_dict(per_sample=False)})
        tracker.plot(os.path.join(self.out, CURVES_FILE))
        tracker_path = os.path.join(self.out, "tracker.json")
        tracker.to_json(tracker_path)
        with open(tracker_path) as f:
            tracker_dict = json.load(f)
        result = {
            "config": self.config.to_dict(),
            "split": {"n_train_a": len(self.split.index_a), "n_train_b": len(self.split.index_b),
                      "n_test": len(self.split.index_test), "image_shape": list(self.image_shape)},
            "checkpoints": records,
            "tracker": tracker_dict,
            "tau_bias": tracker.tau_bias, "tau_test": tracker.tau_test,
            "biased_window": _jsonable(tracker.biased_window),
            "final": final.to_dict() if final is not None else None,
        }
        write_json_atomic(result, os.path.join(self.out, REPORT_FILE))
        return result


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def save_sample_grid(samples_a: torch.Tensor, samples_b: torch.Tensor, path: str, pairs: int = 16) -> None:
    """A PNG with sample j of A above sample j of B (row pairs), pixel values mapped from [−1, 1] to [0, 1],
    enlarged (nearest neighbour) to about 32 px per image so small images stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(pairs, samples_a.shape[0])
    rows = torch.stack([samples_a[:k], samples_b[:k]])  # (2, k, C, H, W)
    c, h, w = rows.shape[2:]
    pad = 1
    grid = torch.ones(c, 2 * (h + pad) + pad, k * (w + pad) + pad)
    for r in range(2):
        for j in range(k):
            top, left = pad + r * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = (rows[r, j].clamp(-1, 1) + 1) / 2
    scale = max(1, 32 // max(h, w))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    image = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plt.imsave(path, image, cmap="gray" if c == 1 else None, vmin=0, vmax=1)


def summary_table(result: dict) -> str:
    lines = [f"{'step':>7} {'train loss':>10} {'test loss':>10} {'pair dist':>10} {'score':>7} "
             f"{'95% CI':>16} {'f_mem':>6}"]
    for record in result["checkpoints"]:
        bias = record["bias"]
        pair = bias["pair_distance"]
        pair_mean = pair["mean"] if isinstance(pair, dict) else pair
        low, high = bias["score_ci"]
        score = "undef." if bias["score"] is None else f"{bias['score']:.3f}"  # all ties: see score_undefined
        lines.append(f"{record['step']:>7} {record['train_loss']:>10.4f} {record['test_loss']:>10.4f} "
                     f"{pair_mean:>10.4f} {score:>7} [{low:>6.3f}, {high:>6.3f}] "
                     f"{bias['memorized_fraction']:>6.3f}")
    lines.append(f"tau_bias (pair-distance minimum after the initial rise) = {result['tau_bias']}, tau_test (test-loss minimum) = "
                 f"{result['tau_test']}")
    return "\n".join(lines)
