"""Training the two `SequenceDenoiser`s of a sample split: model A on data block 0, model B on block 1.

Per epoch: a fresh permutation of the block, batches of `batch_size`, one t ~ U{1..T} and one noise draw per sample
(the paper's `DiffusionDataset`), cross-entropy of the x0 logits against the clean tokens, Adam with the paper's
LambdaLR "default" schedule. The two networks run as one `GroupedDenoiser` (stacked weights, one batched pass, one
Adam over the stacks, which is elementwise and so the same as one Adam each); each model keeps its own block and
noise stream, so the pair trains as two separate models would, up to float rounding. Weights are saved on a
log-spaced epoch grid. All randomness is counter-based (seeded by (seed, model, epoch)), so a run resumed from its
last saved state ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from biasfast._core.io import (CorruptCheckpointError, folder_lock, load_checkpoint, remove_stale_temporaries,
                               save_atomic, write_json_atomic)
from biasfast._core.seeds import generator_for, seed_for
from biasfast.hierarchy.denoiser import SequenceDenoiser
from biasfast.hierarchy.diffusion import OneHotDiffusion
from biasfast.hierarchy.grouped import GroupedDenoiser
from biasfast.hierarchy.model import FilteredHierarchicalModel
from biasfast.diffusion.training import log_spaced_steps

NAMES = ("A", "B")  # model A trains on block 0, model B on block 1
CONFIG_FILE = "config.json"
STATE_FILE = "pair_state.pt"  # both models, their optimizer and schedule, at the last saved epoch


@dataclass(frozen=True)
class PairConfig:
    """Everything that defines the trained pair; a models folder is reused only for an equal config."""

    q: int = 6
    depth: int = 4
    sigma: float = 1.0
    q_eff: int = 4
    data_seed: int = 0
    n_train: int = 128
    epochs: int = 1500
    checkpoints: int = 12
    first_checkpoint: int = 10
    width: int = 64
    layers: int = 2
    batch_size: int = 512
    lr: float = 3e-4
    warmup_epochs: int = 50
    num_timesteps: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{f.name}: expected a non-negative int, got {value!r}")
        for name in ("n_train", "epochs", "checkpoints", "width", "layers", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")

    def data_model(self) -> FilteredHierarchicalModel:
        return FilteredHierarchicalModel(q=self.q, depth=self.depth, sigma=self.sigma, q_eff=self.q_eff,
                                         seed=self.data_seed)

    def network(self, name: str = "A") -> SequenceDenoiser:
        """A fresh network for model `name`: initial weights from `seed` for A and `seed + 1` for B.

        The paper's model pairs start from independent initialisations, so KL(A ‖ B) measures the disagreement
        that training on different data leaves, not how far two copies of one initialisation drift apart.
        """
        with torch.random.fork_rng():
            torch.manual_seed(seed_for(self.seed, "hierarchy-init", name))
            return SequenceDenoiser(self.q, 2**self.depth, self.width, self.layers)

    def epoch_grid(self) -> list[int]:
        return log_spaced_steps(self.epochs, self.checkpoints, self.first_checkpoint)


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The paper's LambdaLR "default": linear from 1 to 0.5 over `warmup` epochs, then cosine down to 0.1."""
    if epoch < warmup:
        return 1.0 - 0.5 * epoch / warmup
    progress = (epoch - warmup) / max(1, epochs - warmup)
    return 0.1 + 0.2 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of x0 logits (B, L, q) against tokens (B, L), averaged."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


class PairTrainer:
    """Trains (or resumes, or reuses) the pair in `folder`; `weights(name, epoch)` loads a saved checkpoint."""

    def __init__(self, config: PairConfig, folder: str, device: str | torch.device = "cpu") -> None:
        self.config, self.folder, self.device = config, folder, torch.device(device)
        path = os.path.join(folder, CONFIG_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                stored = json.load(f)
            if stored != asdict(config):
                changed = sorted(k for k in set(stored) | set(asdict(config)) if stored.get(k) != asdict(config).get(k))
                raise ValueError(f"models: {folder!r} holds a pair trained with other settings ({', '.join(changed)});"
                                 " pass another --models folder")
        self.diffusion = OneHotDiffusion(config.q, config.num_timesteps)
        self.data = config.data_model()
        self.blocks = {name: self.data.rows(i * config.n_train, (i + 1) * config.n_train)
                       for i, name in enumerate(NAMES)}

    def checkpoint_path(self, name: str, epoch: int) -> str:
        return os.path.join(self.folder, name, f"epoch_{epoch:06d}.pt")

    def _state_path(self) -> str:
        return os.path.join(self.folder, STATE_FILE)

    def done(self) -> bool:
        return all(os.path.isfile(self.checkpoint_path(n, self.config.epochs)) for n in NAMES)

    def train(self, progress: bool = True) -> None:
        """Both models in one batched computation (`GroupedDenoiser`), each on its own block and noise stream;
        resumes from the state file; one process per folder at a time."""
        with folder_lock(self.folder, "models"):
            path = os.path.join(self.folder, CONFIG_FILE)
            if not os.path.isfile(path):
                write_json_atomic(asdict(self.config), path)
            for name in NAMES:
                remove_stale_temporaries(os.path.join(self.folder, name))
            remove_stale_temporaries(self.folder)
            self._train_pair(progress)

    def _resume_state(self) -> dict | None:
        """The saved training state; an unreadable one is reported by name and training restarts from epoch 0
        (the result is the same, only slower)."""
        if not os.path.isfile(self._state_path()):
            return None
        try:
            return load_checkpoint(self._state_path())
        except CorruptCheckpointError as exc:
            warnings.warn(f"models: {exc}; training the pair again from the start", stacklevel=3)
            return None

    def _train_pair(self, progress: bool) -> None:
        config = self.config
        state = self._resume_state()
        if state is not None and int(state["epoch"]) >= config.epochs:
            return
        pair = GroupedDenoiser([config.network(name) for name in NAMES]).to(self.device)
        optimizer = torch.optim.Adam(pair.parameters(), lr=config.lr)  # elementwise: the same as one Adam each
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: lr_factor(e, config.epochs, min(config.warmup_epochs, config.epochs)))
        losses: dict[str, list[float]] = {name: [] for name in NAMES}
        epoch = 0
        if state is not None:
            pair.load_state_dict(state["pair"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            epoch, losses = int(state["epoch"]), {name: list(state["losses"][name]) for name in NAMES}
        grid = set(config.epoch_grid())
        data = torch.stack([self.blocks[name] for name in NAMES])
        bar = tqdm(total=config.epochs, initial=epoch, desc="training the pair", unit="epoch",
                   disable=not progress, leave=False)
        pair.train()
        while epoch < config.epochs:
            generators = [generator_for(config.seed, "hierarchy", name, epoch) for name in NAMES]
            orders = [torch.randperm(config.n_train, generator=g) for g in generators]
            totals = torch.zeros(len(NAMES), dtype=torch.float64)
            for start in range(0, config.n_train, config.batch_size):
                tokens = torch.stack([data[i][order[start : start + config.batch_size]]
                                      for i, order in enumerate(orders)])
                t = torch.stack([self.diffusion.random_timesteps(tokens.shape[1], g) for g in generators])
                x_t = torch.stack([self.diffusion.noise(tokens[i], t[i], g) for i, g in enumerate(generators)])
                logits = pair(x_t.to(self.device), t.to(self.device))
                per_model = torch.stack([cross_entropy(logits[i], tokens[i].to(self.device))
                                         for i in range(len(NAMES))])
                optimizer.zero_grad(set_to_none=True)
                per_model.sum().backward()  # the groups share no weight: each gets its own loss's gradient
                optimizer.step()
                totals += per_model.detach().double().cpu() * tokens.shape[1]
            schedule.step()
            epoch += 1
            for name, total in zip(NAMES, totals.tolist()):
                losses[name].append(total / config.n_train)
            bar.update(1)
            bar.set_postfix(loss=f"{losses['A'][-1]:.4f}/{losses['B'][-1]:.4f}")
            if epoch in grid:
                for i, name in enumerate(NAMES):
                    save_atomic(pair.network_state(i), self.checkpoint_path(name, epoch))
                save_atomic({"epoch": epoch, "losses": losses, "pair": pair.state_dict(),
                             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                            self._state_path())
        bar.close()

    def weights(self, name: str, epoch: int) -> SequenceDenoiser:
        """Network `name` at checkpoint `epoch`, in eval mode, on the trainer's device."""
        network = self.config.network(name)
        network.load_state_dict(load_checkpoint(self.checkpoint_path(name, epoch)))
        return network.to(self.device).eval().requires_grad_(False)

    def train_losses(self, name: str) -> list[float]:
        """Mean training loss of every epoch (the running loss at random t)."""
        return list(load_checkpoint(self._state_path())["losses"][name])
