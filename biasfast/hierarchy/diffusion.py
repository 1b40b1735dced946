"""Gaussian diffusion on one-hot tokens and its DDPM posterior sampler (the paper's `posterior_process`).

Timesteps run t = 1..T with ᾱ_t = `NoiseSchedule("diffusion_lm", T).alphas_cumprod[t − 1]` and ᾱ_0 = 1, so
t/T = 0.15 (t = 75 at T = 500) has ᾱ ≈ 0.79 and t = T has ᾱ ≈ 4e-5. One reverse step from t to s < t draws
x_s ~ q(x_s | x_t, x0 = x̂0) with the x0 estimate x̂0 of any denoiser: the model's softmax, the exact BP marginals
or BP_k. With s = t − 1 at every step this is ancestral DDPM; fewer steps use the same posterior across the gap.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from biasfast._core.checks import check_tensor
from biasfast.hierarchy import bp
from biasfast.diffusion.schedules import NoiseSchedule

X0Estimate = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t (B, L, q), t) → x̂0 probabilities (B, L, q)


class OneHotDiffusion:
    """x_t = sqrt(ᾱ_t)·onehot(x0) + sqrt(1 − ᾱ_t)·ε on sequences of q-ary tokens; T = 500 by default."""

    def __init__(self, q: int, num_timesteps: int = 500, schedule: str = "diffusion_lm") -> None:
        if not isinstance(q, int) or q < 2:
            raise ValueError(f"q: expected an int ≥ 2, got {q!r}")
        self.q = q
        self.schedule = NoiseSchedule(schedule, num_timesteps)
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), self.schedule.alphas_cumprod])  # [t], t = 0..T

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def timestep(self, fraction: float) -> int:
        """The timestep t = floor(fraction·T), at least 1 (the paper's "t/T = fraction")."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: expected t/T in (0, 1], got {fraction!r}")
        return max(1, int(fraction * self.num_timesteps))

    def check_timesteps(self, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.numel() and (t.min() < 1 or t.max() > self.num_timesteps):
            raise ValueError(f"t: timesteps must be integers in [1, {self.num_timesteps}], got {t.tolist()!r}"[:200])
        return t.long()

    def random_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One t ~ U{1..T} per sample (n,)."""
        return torch.randint(1, self.num_timesteps + 1, (n,), generator=generator)

    def noise(self, tokens: torch.Tensor, t: torch.Tensor | int, generator: torch.Generator | None = None
              ) -> torch.Tensor:
        """x_t (B, L, q) float32 for token sequences (B, L) at timesteps t (scalar or (B,))."""
        check_tensor(tokens, "tokens")
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape (batch, length), got {tuple(tokens.shape)}")
        bp.check_sequences(tokens, self.q, tokens.shape[1], "tokens")
        t = self.check_timesteps(t).expand(tokens.shape[0])
        x0 = nn.functional.one_hot(tokens, self.q).float()
        eps = torch.randn(x0.shape, generator=generator).to(tokens.device)
        alpha = self.alpha_bar[t].float().to(tokens.device)[:, None, None]
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps

    def posterior_step(self, x_t: torch.Tensor, t: int, s: int, x0_hat: torch.Tensor, noise: torch.Tensor | None
                       ) -> torch.Tensor:
        """x_s ~ q(x_s | x_t, x0 = x̂0) for 0 ≤ s < t (no noise when s = 0: x_0 = x̂0)."""
        a_t, a_s = float(self.alpha_bar[t]), float(self.alpha_bar[s])
        a_ts = a_t / a_s  # ᾱ_{t|s}
        mean = (a_s**0.5 * (1 - a_ts) / (1 - a_t)) * x0_hat + (a_ts**0.5 * (1 - a_s) / (1 - a_t)) * x_t
        if s == 0 or noise is None:
            return mean
        return mean + ((1 - a_ts) * (1 - a_s) / (1 - a_t)) ** 0.5 * noise

    def reverse_timesteps(self, start: int, steps: int | None = None) -> list[int]:
        """Descending timesteps start = t_0 > t_1 > ... > 0: every step, or `steps` evenly spaced ones."""
        start = int(self.check_timesteps(start))
        steps = start if steps is None else min(steps, start)
        if steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        grid = torch.linspace(start, 0, steps + 1, dtype=torch.float64).round().long().tolist()
        return sorted(set(grid), reverse=True)

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, t: int, x0_estimate: X0Estimate, *, steps: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens (B, L): the posterior sampler run from x_t at timestep t down to 0, then argmax.

        The step noise is drawn in order from `generator` on the CPU, so equal seeds give two denoisers
        identical noise (paired sampling).
        """
        check_tensor(x_t, "x_t")
        if x_t.dim() != 3 or x_t.shape[-1] != self.q or not x_t.is_floating_point():
            raise ValueError(f"x_t: expected a floating (batch, length, {self.q}) tensor, got {x_t.dtype} "
                             f"{tuple(x_t.shape)}")
        grid = self.reverse_timesteps(t, steps)
        x = x_t.float()
        for now, nxt in zip(grid[:-1], grid[1:]):
            x0_hat = x0_estimate(x, now)
            noise = torch.randn(x.shape, generator=generator).to(x.device) if nxt > 0 else None
            x = self.posterior_step(x, now, nxt, x0_hat.to(x.dtype), noise)
        return x.argmax(-1)

    def sample(self, x0_estimate: X0Estimate, n: int, length: int, *, steps: int | None = None,
               generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """n fresh sequences (n, length): x_T ~ N(0, I) from `generator`, then `denoise` from t = T."""
        x_T = torch.randn((n, length, self.q), generator=generator).to(device)
        return self.denoise(x_T, self.num_timesteps, x0_estimate, steps=steps, generator=generator)


def network_estimate(network: nn.Module, batch: int = 4096) -> X0Estimate:
    """x̂0 = softmax of the network's logits, evaluated `batch` sequences at a time (bounded memory) on the
    network's device and returned on x_t's (the sampler's state stays where it is; only the network moves)."""
    device = next(network.parameters()).device

    def estimate(x_t: torch.Tensor, t: int) -> torch.Tensor:
        return torch.cat([network(chunk.to(device), torch.full((len(chunk),), t, dtype=torch.long, device=device))
                          .softmax(-1).to(x_t.device) for chunk in x_t.split(batch)])

    return estimate


def bp_estimate(model, diffusion: OneHotDiffusion, k: int = 0) -> X0Estimate:
    """x̂0 = the exact posterior marginals of `model` (a FilteredHierarchicalModel), or BP_k for k > 0."""

    def estimate(x_t: torch.Tensor, t: int) -> torch.Tensor:
        return model.filtered_denoiser(x_t, float(diffusion.alpha_bar[t]), k)

    return estimate
