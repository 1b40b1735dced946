"""DPM-Solver++(2M), the multistep data-prediction solver (Lu et al. 2022), as diffusers'
`DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` runs it with its defaults
(solver_type "midpoint", lower_order_final, final_sigmas_type "zero", timestep_spacing "linspace").

With λ = log(α/σ), α = √ᾱ, σ = √(1 − ᾱ), one step s0 → t with h = λ_t − λ_s0 and the previous step's
h0 = λ_s0 − λ_s1 is

    x_t = (σ_t/σ_s0)·x − α_t(e^{−h} − 1)·m0 − ½·α_t(e^{−h} − 1)·(h/h0)·(m0 − m1)

for the data predictions m0 (now) and m1 (previous step). Its first two terms are exactly the DDIM (η = 0) step
from x with data prediction m0 (DDIM is DPM-Solver-1), so a step here is the fused DDIM step of
`biasfast::sampler_step`, which also returns m0, plus `correction·(m0 − m1)`, one scalar per step. The first
step (no m1 yet) and the last (to σ = 0, lower_order_final) are first order: correction 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from biasfast.diffusion.schedules import NoiseSchedule


def dpm_solver_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """Descending timesteps of diffusers' DPM-Solver "linspace" spacing: steps + 1 points from 0 to T − 1,
    rounded, the 0 dropped (the last step goes to σ = 0, written t_prev = −1). Same NumPy code, same rounding."""
    total = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ValueError(f"steps: expected an int in [1, {total}], got {steps!r}")
    return np.linspace(0, total - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()


def second_order_corrections(schedule: NoiseSchedule, timesteps: list[int]) -> list[float]:
    """Per step k (from timesteps[k] to the next, −1 last): the factor of (m0 − m1) added to the DDIM step,
    ½·α_t(1 − e^{−h})·h/h0, in float64 from the ᾱ table (host side, once per chain: no step syncs)."""
    alphas = schedule.alphas_cumprod.tolist()

    def log_snr_half(t: int) -> float:  # λ = log(α/σ); t = −1 is the clean end (λ = +∞)
        if t < 0:
            return math.inf
        alpha = alphas[t]
        return 0.5 * (math.log(alpha) - math.log1p(-alpha)) if alpha < 1 else math.inf

    targets = timesteps[1:] + [-1]
    corrections = []
    for k, (now, target) in enumerate(zip(timesteps, targets)):
        if k == 0 or target < 0:
            corrections.append(0.0)
            continue
        h = log_snr_half(target) - log_snr_half(now)
        h_prev = log_snr_half(now) - log_snr_half(timesteps[k - 1])
        alpha_target = math.sqrt(alphas[target])
        corrections.append(0.5 * alpha_target * -math.expm1(-h) * h / h_prev if math.isfinite(h_prev) else 0.0)
    return corrections


def apply_correction(x: torch.Tensor, x0: torch.Tensor, x0_previous: torch.Tensor | None, correction: float
                     ) -> None:
    """x += correction·(x0 − x0_previous), in place (the second-order term of a multistep update)."""
    if x0_previous is not None and correction != 0.0:
        x.add_(x0 - x0_previous, alpha=correction)
