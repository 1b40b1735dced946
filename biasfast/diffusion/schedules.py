"""Noise schedules of discrete-time diffusion: ᾱ_t tables, SNR, sigmas and respacing for samplers.

Everything is kept in float64 (the SNR spans ~9 orders of magnitude) and cast once per device/dtype
for kernels, so training and sampling loops never rebuild or synchronise on these tables.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from biasfast._core.constants import PREDICTIONS

NAMED_SCHEDULES = ("linear", "scaled_linear", "cosine", "diffusion_lm")
SPACINGS = ("leading", "trailing", "linspace")
DEFAULT_SPACING = "leading"  # DDPMScheduler's and DDIMScheduler's; DPM-Solver++ has its own (`dpm_solver`)
DDIM_PREVIOUS = ("next", "stride")  # where a DDIM step goes: the next listed timestep, or t − T//steps
STRIDE_SCHEDULERS = ("DDIMScheduler",)  # diffusers schedulers whose DDIM step computes t − T//steps


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

    `schedule` is a name in NAMED_SCHEDULES, a 1-D tensor of ᾱ_t, or a diffusers scheduler (anything with
    `alphas_cumprod` and a `config`; see `from_diffusers`), so existing pipelines plug in their own tables.
    `prediction`, `spacing`, `steps_offset` and `clip_sample` are the defaults the samplers use with this
    schedule (diffusers keeps them in the scheduler's config; a name or a table gets the DDPM defaults).
    `spacing` None (a name or a table, unless given) leaves each sampler its own diffusers scheduler's default:
    "leading" for DDPM and DDIM, "linspace" for DPM-Solver++; a diffusers scheduler's spacing is always set.
    `ddim_previous` is where a DDIM step from t goes: "next", the next timestep of the list, or "stride",
    t − T//steps as diffusers' DDIMScheduler does whatever its spacing (the two differ for linspace and
    trailing spacing when T/steps is not an integer); a DDIMScheduler gives "stride".
    `set_alpha_to_one`: where DDIM's last step goes, ᾱ = 1 (x0) or, when False, ᾱ_0, as diffusers'
    DDIMScheduler option of that name (Stable Diffusion's scheduler sets it False).
    """

    def __init__(
        self,
        schedule: Any = "linear",
        num_timesteps: int = 1000,
        *,
        zero_terminal_snr: bool = False,
        prediction: str = "epsilon",
        spacing: str | None = None,
        steps_offset: int = 0,
        clip_sample: float | None = None,
        ddim_previous: str = "next",
        set_alpha_to_one: bool = True,
    ) -> None:
        rescaled = False  # the ᾱ table came rescaled to zero terminal SNR (a diffusers scheduler's may)
        if isinstance(schedule, str):
            if not isinstance(num_timesteps, int) or num_timesteps < 2:
                raise ValueError(f"num_timesteps: expected an int ≥ 2, got {num_timesteps!r}")
            alphas_cumprod = torch.cumprod(1 - _named_betas(schedule, num_timesteps), dim=0)
            self.name = schedule
        elif isinstance(schedule, torch.Tensor):
            alphas_cumprod = schedule.detach().to("cpu", torch.float64).flatten()
            self._check_table(alphas_cumprod)
            self.name = "custom"
        elif _is_diffusers_scheduler(schedule):
            settings = _diffusers_settings(schedule)
            alphas_cumprod = settings.pop("alphas_cumprod")
            self._check_table(alphas_cumprod)
            self.name = type(schedule).__name__
            rescaled = settings.pop("zero_terminal_snr")
            zero_terminal_snr = False  # never rescale twice
            prediction, spacing = settings["prediction"], settings["spacing"]
            steps_offset, clip_sample = settings["steps_offset"], settings["clip_sample"]
            ddim_previous, set_alpha_to_one = settings["ddim_previous"], settings["set_alpha_to_one"]
        else:
            raise TypeError(f"schedule: expected a name, an alphas_cumprod tensor or a diffusers scheduler, "
                            f"got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: unknown {prediction!r}; expected one of {PREDICTIONS}")
        if spacing is not None and spacing not in SPACINGS:
            raise ValueError(f"spacing: unknown {spacing!r}; expected one of {SPACINGS}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset: expected an int ≥ 0, got {steps_offset!r}")
        if not isinstance(set_alpha_to_one, bool):
            raise TypeError(f"set_alpha_to_one: expected a bool, got {type(set_alpha_to_one).__name__}")
        if ddim_previous not in DDIM_PREVIOUS:
            raise ValueError(f"ddim_previous: unknown {ddim_previous!r}; expected one of {DDIM_PREVIOUS}")
        if clip_sample is not None and not (isinstance(clip_sample, (int, float)) and clip_sample > 0):
            raise ValueError(f"clip_sample: expected a positive range or None, got {clip_sample!r}")
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.zero_terminal_snr = zero_terminal_snr or rescaled
        self.alphas_cumprod = alphas_cumprod
        self.prediction, self.spacing, self.steps_offset = prediction, spacing, steps_offset
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self.ddim_previous = ddim_previous
        self.set_alpha_to_one = set_alpha_to_one
        # a diffusers scheduler's whole config, for the samplers' checks of settings they do not implement
        self.scheduler_config = dict(schedule.config) if _is_diffusers_scheduler(schedule) else {}
        self._device_tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> "NoiseSchedule":
        """The schedule of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ...): its ᾱ table as it is
        (float32, zero-terminal rescaling already applied when `rescale_betas_zero_snr`), and from its config
        `prediction_type`, `timestep_spacing`, `steps_offset`, `set_alpha_to_one` and the `clip_sample` range."""
        if not _is_diffusers_scheduler(scheduler):
            raise TypeError(f"scheduler: expected a diffusers scheduler (with alphas_cumprod and config), "
                            f"got {type(scheduler).__name__}")
        return cls(scheduler)

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
    def final_alpha_cumprod(self) -> float:
        """ᾱ where DDIM's last step (t_prev = −1) lands: 1, or ᾱ_0 without `set_alpha_to_one`."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

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

    def timesteps(self, steps: int | None = None, spacing: str | None = None) -> torch.Tensor:
        """Descending sampler timesteps, respaced to `steps` as diffusers' `timestep_spacing` does (default: this
        schedule's spacing, else "leading"); "leading" adds `steps_offset`, as diffusers does."""
        total = self.num_timesteps
        spacing = (self.spacing or DEFAULT_SPACING) if spacing is None else spacing
        steps = total if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= total:
            raise ValueError(f"steps: expected an int in [1, {total}], got {steps!r}")
        if spacing == "leading":
            t = torch.arange(steps, dtype=torch.int64) * (total // steps) + self.steps_offset
            if t[-1] >= total:
                raise ValueError(f"steps: {steps} leading steps with steps_offset {self.steps_offset} reach "
                                 f"timestep {int(t[-1])}, past the last one ({total - 1})")
        elif spacing == "trailing":
            t = (torch.arange(total, 0, -total / steps, dtype=torch.float64).round() - 1).to(torch.int64).flip(0)
        elif spacing == "linspace":
            t = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().to(torch.int64)
        else:
            raise ValueError(f"spacing: unknown {spacing!r}; expected one of {SPACINGS}")
        return t.flip(0)

    def previous_timesteps(self, timesteps: list[int], method: str) -> list[int]:
        """Where the step from each of `timesteps` goes (−1: to x0): the next one, or for DDIM with
        `ddim_previous="stride"` t − T//steps, as diffusers' DDIMScheduler.step computes `prev_timestep`."""
        if method == "ddim" and self.ddim_previous == "stride":
            stride = self.num_timesteps // len(timesteps)
            return [t - stride if t >= stride else -1 for t in timesteps]
        return timesteps[1:] + [-1]

    def __repr__(self) -> str:
        return (f"NoiseSchedule({self.name!r}, num_timesteps={self.num_timesteps}, "
                f"zero_terminal_snr={self.zero_terminal_snr}, prediction={self.prediction!r}, "
                f"spacing={self.spacing!r}, steps_offset={self.steps_offset}, clip_sample={self.clip_sample}, "
                f"ddim_previous={self.ddim_previous!r}, set_alpha_to_one={self.set_alpha_to_one})")


def _is_diffusers_scheduler(value: Any) -> bool:
    return isinstance(getattr(value, "alphas_cumprod", None), torch.Tensor) and hasattr(value, "config")


def _diffusers_settings(scheduler: Any) -> dict[str, Any]:
    """What a diffusers scheduler's config says about sampling, under biasfast's names; diffusers' defaults
    (DDPMScheduler's) for keys a scheduler does not have."""
    config = scheduler.config
    get = config.get if hasattr(config, "get") else (lambda key, default: getattr(config, key, default))
    clip = get("clip_sample", False)
    return {
        "alphas_cumprod": scheduler.alphas_cumprod.detach().to("cpu", torch.float64).flatten(),
        "prediction": get("prediction_type", "epsilon"),
        "spacing": get("timestep_spacing", DEFAULT_SPACING),
        "steps_offset": int(get("steps_offset", 0)),
        "clip_sample": float(get("clip_sample_range", 1.0)) if clip else None,
        "zero_terminal_snr": bool(get("rescale_betas_zero_snr", False)),
        "ddim_previous": "stride" if type(scheduler).__name__ in STRIDE_SCHEDULERS else "next",
        "set_alpha_to_one": bool(get("set_alpha_to_one", True)),
    }
