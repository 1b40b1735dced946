"""DPM-Solver++(2M), the multistep data-prediction solver (Lu et al. 2022), as diffusers'
`DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` runs it with its defaults
(solver_type "midpoint", lower_order_final, final_sigmas_type "zero", lambda_min_clipped −inf) and any of its
timestep spacings ("linspace", its default; "leading" with steps_offset; "trailing"), by its own rules, which
are not DDIM's.

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

from biasfast.diffusion.schedules import SPACINGS, NoiseSchedule

DPM_SOLVER_SPACING = "linspace"  # DPMSolverMultistepScheduler's default timestep_spacing
# The DPMSolverMultistepScheduler settings this solver implements, at the only values it implements: a scheduler
# that sets another value samples differently, so sampling with its schedule is an error, not a silent change.
IMPLEMENTED_SETTINGS = {
    "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False,
}


def check_dpm_solver_settings(schedule: NoiseSchedule) -> None:
    """ValueError naming every DPM-Solver setting of the schedule's diffusers scheduler that this solver does not
    implement (a DDPM or DDIM scheduler has none of these keys, so it passes)."""
    config = schedule.scheduler_config
    unsupported = {key: config[key] for key, value in IMPLEMENTED_SETTINGS.items()
                   if key in config and config[key] != value}
    if unsupported:
        raise ValueError(f"schedule: method='dpmsolver++' implements DPMSolverMultistepScheduler with "
                         f"{IMPLEMENTED_SETTINGS}; this {schedule.name} sets "
                         + ", ".join(f"{key}={value!r}" for key, value in unsupported.items()))


def dpm_solver_timesteps(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> list[int]:
    """Descending timesteps of `DPMSolverMultistepScheduler.set_timesteps` (diffusers 0.42) for `spacing`
    (default: the schedule's, else "linspace", DPM-Solver's own default), in the same NumPy code so that the
    rounding is the same. Each list stops short of 0: the last step goes to σ = 0, written t_prev = −1.

    linspace: steps + 1 points from 0 to T − 1, rounded, the 0 dropped. leading: multiples of T // (steps + 1),
    the 0 dropped, plus `steps_offset` (not DDIM's multiples of T // steps). trailing: T down by T/steps,
    rounded, minus 1 (as DDIM's)."""
    total = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ValueError(f"steps: expected an int in [1, {total}], got {steps!r}")
    spacing = (schedule.spacing or DPM_SOLVER_SPACING) if spacing is None else spacing
    if spacing == "linspace":
        timesteps = np.linspace(0, total - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, steps + 1) * (total // (steps + 1))).round()[::-1][:-1] + schedule.steps_offset
    elif spacing == "trailing":
        timesteps = np.arange(total, 0, -total / steps).round() - 1
    else:
        raise ValueError(f"spacing: unknown {spacing!r} for DPM-Solver++; expected one of {SPACINGS}")
    timesteps = timesteps.astype(np.int64).tolist()
    if spacing == "leading" and (steps >= total or timesteps[0] >= total):
        raise ValueError(f"steps: {steps} leading DPM-Solver++ steps with steps_offset {schedule.steps_offset} "
                         f"do not fit in {total} timesteps (they need T // (steps + 1) ≥ 1 and the first one < T)")
    return timesteps


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
