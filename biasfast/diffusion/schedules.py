"""Noise schedules of discrete-time diffusion: ᾱ_t tables, SNR, sigmas and respacing for samplers.

Everything is kept in float64 (the SNR spans ~9 orders of magnitude) and cast once per device/dtype
for kernels, so training and sampling loops never rebuild or synchronise on these tables.
"""

from __future__ import annotations

import math

import torch

NAMED_SCHEDULES = ("linear", "scaled_linear", "cosine", "diffusion_lm")
SPACINGS = ("leading", "trailing", "linspace")


def _linear_betas(start: float, end: float, num_timesteps: int) -> torch.Tensor:
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), betas capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def _named_betas(name: str, num_timesteps: int) -> torch.Tensor:
    if name == "linear":  # DDPM / Unmasking-Bias / Diffusing-DeBias setting (diffusers "linear")
        return _linear_betas(1e-4, 0.02, num_timesteps)
    if name == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return _linear_betas(0.00085**0.5, 0.012**0.5, num_timesteps) ** 2
    if name == "cosine":
        return _cosine_betas(num_timesteps)
    if name == "diffusion_lm":  # guided-diffusion "linear" rescaled by 1000/T (2e-4 → 0.04 at T = 500)
        scale = 1000.0 / num_timesteps
        return _linear_betas(scale * 1e-4, scale * 0.02, num_timesteps)
    raise ValueError(f"schedule: unknown name {name!r}; expected one of {NAMED_SCHEDULES} or an alphas_cumprod tensor")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale sqrt(ᾱ) so the last step has SNR exactly 0, keeping the first."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


class NoiseSchedule:
    """A variance-preserving schedule x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, t = 0..T−1.

    `schedule` is a name in NAMED_SCHEDULES or a 1-D tensor of ᾱ_t (e.g. a diffusers scheduler's
    `alphas_cumprod`), so existing pipelines plug in their own tables.
    """

    def __init__(
        self,
        schedule: str | torch.Tensor = "linear",
        num_timesteps: int = 1000,
        *,
        zero_terminal_snr: bool = False,
    ) -> None:
        if isinstance(schedule, str):
            if not isinstance(num_timesteps, int) or num_timesteps < 2:
                raise ValueError(f"num_timesteps: expected an int ≥ 2, got {num_timesteps!r}")
            alphas_cumprod = torch.cumprod(1 - _named_betas(schedule, num_timesteps), dim=0)
            self.name = schedule
        elif isinstance(schedule, torch.Tensor):
            alphas_cumprod = schedule.detach().to("cpu", torch.float64).flatten()
            self._check_table(alphas_cumprod)
            self.name = "custom"
        else:
            raise TypeError(f"schedule: expected a name or an alphas_cumprod tensor, got {type(schedule).__name__}")
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.zero_terminal_snr = zero_terminal_snr
        self.alphas_cumprod = alphas_cumprod
        self._device_tables: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _check_table(alphas_cumprod: torch.Tensor) -> None:
        if alphas_cumprod.numel() < 2:
            raise ValueError("schedule: an alphas_cumprod table needs at least 2 entries")
        if not torch.isfinite(alphas_cumprod).all():
            raise ValueError("schedule: alphas_cumprod contains NaN or Inf")
        if (alphas_cumprod[:-1] <= 0).any() or (alphas_cumprod < 0).any() or (alphas_cumprod > 1).any():
            raise ValueError("schedule: alphas_cumprod must lie in (0, 1] (only the last entry may be 0)")
        if (alphas_cumprod[1:] > alphas_cumprod[:-1]).any():
            raise ValueError("schedule: alphas_cumprod must be non-increasing in t")

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def betas(self) -> torch.Tensor:
        previous = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return 1 - self.alphas_cumprod / previous

    @property
    def snr(self) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t); 0 at a zero-terminal step."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        return self.snr.log()

    @property
    def sigmas(self) -> torch.Tensor:
        """Variance-exploding noise levels σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) = SNR^(-1/2) (k-diffusion, EDM)."""
        return (1 / self.snr).sqrt()

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ᾱ_t on `device` in `dtype`, cached: kernels index it with device-resident timesteps."""
        key = (torch.device(device), dtype)
        if key not in self._device_tables:
            self._device_tables[key] = self.alphas_cumprod.to(device=key[0], dtype=dtype)
        return self._device_tables[key]

    def timesteps(self, steps: int | None = None, spacing: str = "leading") -> torch.Tensor:
        """Descending sampler timesteps, respaced to `steps` as diffusers' `timestep_spacing` does."""
        total = self.num_timesteps
        steps = total if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= total:
            raise ValueError(f"steps: expected an int in [1, {total}], got {steps!r}")
        if spacing == "leading":
            t = torch.arange(steps, dtype=torch.int64) * (total // steps)
        elif spacing == "trailing":
            t = (torch.arange(total, 0, -total / steps, dtype=torch.float64).round() - 1).to(torch.int64).flip(0)
        elif spacing == "linspace":
            t = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().to(torch.int64)
        else:
            raise ValueError(f"spacing: unknown {spacing!r}; expected one of {SPACINGS}")
        return t.flip(0)

    def __repr__(self) -> str:
        return (f"NoiseSchedule({self.name!r}, num_timesteps={self.num_timesteps}, "
                f"zero_terminal_snr={self.zero_terminal_snr})")
