"""Per-timestep loss weights w(t) of the common diffusion weightings, on one footing.

Each scheme is defined by its weight on the x0 (sample) loss, λ_x0(SNR); with x_t = αx0 + σε,
‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and ‖v − v̂‖² = (SNR + 1)·‖x0 − x̂0‖², so the same scheme weights an
ε-loss by λ_x0/SNR and a v-loss by λ_x0/(SNR + 1). The ε-forms are written out analytically so that
SNR = 0 (zero-terminal-SNR schedules) gives the true limit (finite, or +inf) instead of 0/0.

| name            | ε-loss weight          | x0 weight          | source                                  |
|-----------------|------------------------|--------------------|-----------------------------------------|
| "constant"      | 1 for every prediction | (plain MSE)        | DDPM "simple"                           |
| "debias"        | 1/√SNR                 | √SNR               | Unmasking Bias (Yu et al. 2024)         |
| "p2"            | 1/(k + SNR)^γ          | SNR/(k + SNR)^γ    | P2 (Choi et al. 2022), k=1, γ=1         |
| "min_snr"       | min(SNR, γ)/SNR        | min(SNR, γ)        | Min-SNR-γ (Hang et al. 2023), γ=5       |
| "soft_min_snr"  | γ/(SNR + γ)            | SNR·γ/(SNR + γ)    | k-diffusion 'soft-min-snr', γ=1/σ_data² |
| "edm"           | 1 + 1/(σ_d²·SNR)       | SNR + 1/σ_d²       | EDM (Karras et al. 2022), σ_d=0.5       |
| "snr"           | 1                      | SNR                | Min-SNR code, x0 branch                 |
| "inv_snr"       | 1/SNR²                 | 1/SNR              | Min-SNR code, x0 branch                 |
| "truncated_snr" | max(SNR, 1)/SNR        | max(SNR, 1)        | Min-SNR code 'trunc_snr'                |

"min_snr" with convention="diffusers" reproduces the `--snr_gamma` weights of diffusers' training scripts
(examples/text_to_image/train_text_to_image.py and its siblings since December 2023): min(SNR, γ), divided by
SNR for ε and by SNR + 1 for v, left as it is for "sample". Away from SNR = 0 that is the Min-SNR code's
weighting; at SNR = 0 the scripts' v and x0 weights are min(0, γ) = 0, which this convention keeps instead of
the Min-SNR code's 1 (the ε weight keeps its limit 1 where the scripts compute 0/0).
"""

from __future__ import annotations

from typing import Callable

import torch

from biasfast._core.constants import PREDICTIONS
from biasfast.diffusion.schedules import NoiseSchedule

MIN_SNR_CONVENTIONS = ("min_snr", "diffusers")
# Weightings that follow the Min-SNR code's zero-terminal guard: weight = 1 where SNR == 0.
_MIN_SNR_FAMILY = ("min_snr", "snr", "inv_snr", "truncated_snr")

Forms = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]  # (ε-form, x0-form)


def _debias() -> Forms:
    return (lambda s: s.rsqrt()), (lambda s: s.sqrt())


def _p2(k: float = 1.0, gamma: float = 1.0) -> Forms:
    _check_nonnegative(k, "k")
    _check_nonnegative(gamma, "gamma")
    if k == 0:  # SNR^(1−γ): avoids 0·inf at SNR = 0
        return (lambda s: s.pow(-gamma)), (lambda s: s.pow(1 - gamma))
    return (lambda s: (k + s).pow(-gamma)), (lambda s: s * (k + s).pow(-gamma))


def _min_snr(gamma: float = 5.0, convention: str = "min_snr") -> Forms:
    _check_positive(gamma, "gamma")
    if convention not in MIN_SNR_CONVENTIONS:
        raise ValueError(f"convention: unknown {convention!r}; expected one of {MIN_SNR_CONVENTIONS}")
    # min(s, γ)/s written so that s = 0 gives its limit 1 rather than 0/0.
    return (lambda s: torch.where(s < gamma, torch.ones_like(s), gamma / s)), (lambda s: s.clamp(max=gamma))


def _soft_min_snr(gamma: float = 5.0) -> Forms:
    _check_positive(gamma, "gamma")
    return (lambda s: gamma / (s + gamma)), (lambda s: s * gamma / (s + gamma))


def _edm(sigma_data: float = 0.5) -> Forms:
    _check_positive(sigma_data, "sigma_data")
    inv = 1.0 / sigma_data**2
    return (lambda s: 1 + inv / s), (lambda s: s + inv)


def _snr() -> Forms:
    return (lambda s: torch.ones_like(s)), (lambda s: s)


def _inv_snr() -> Forms:
    return (lambda s: s.pow(-2)), (lambda s: s.reciprocal())


def _truncated_snr() -> Forms:
    return (lambda s: s.reciprocal().clamp(min=1)), (lambda s: s.clamp(min=1))


_SCHEMES: dict[str, Callable[..., Forms]] = {
    "debias": _debias,
    "p2": _p2,
    "min_snr": _min_snr,
    "soft_min_snr": _soft_min_snr,
    "edm": _edm,
    "snr": _snr,
    "inv_snr": _inv_snr,
    "truncated_snr": _truncated_snr,
}
WEIGHTINGS = ("constant", *_SCHEMES)


def _check_positive(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def _check_nonnegative(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number ≥ 0, got {value!r}")


def _uses_terminal_guard(name: str, params: dict) -> bool:
    """Whether weight 1 replaces the table where SNR = 0: the Min-SNR code's rule, which diffusers' scripts
    do not follow (their v and x0 weights are 0 there)."""
    return name in _MIN_SNR_FAMILY and params.get("convention") != "diffusers"


def _scheme_weights(name: str, snr: torch.Tensor, prediction: str, params: dict) -> torch.Tensor:
    try:
        eps_form, x0_form = _SCHEMES[name](**params)
    except TypeError as error:  # unexpected keyword
        raise TypeError(f"weighting {name!r}: {error}") from None
    if prediction == "epsilon":
        return eps_form(snr)
    x0 = x0_form(snr)
    return x0 if prediction == "sample" else x0 / (snr + 1)


def weighting(
    name: str,
    schedule: NoiseSchedule,
    prediction: str = "epsilon",
    *,
    max_weight: float | None = None,
    mean: float | None = None,
    **params,
) -> torch.Tensor:
    """Loss weight w(t) for t = 0..T−1 (float64, CPU) of scheme `name` for a model predicting `prediction`.

    `params` are the scheme's own (p2: k, gamma; min_snr: gamma, convention; soft_min_snr: gamma;
    edm: sigma_data). `max_weight` clamps every weight from above; `mean` then rescales the table to that mean
    over t (mean=1 keeps the scheme's shape but not its loudness against an unweighted term such as L_vlb). Where SNR = 0 (zero-terminal-SNR
    schedules) the Min-SNR family uses weight 1 as the Min-SNR code does (min_snr with convention="diffusers"
    keeps the diffusers scripts' values instead); a scheme whose weight is
    infinite there ("debias", "edm", "p2" with k = 0 for ε) gets the largest finite weight of the table
    unless `max_weight` is given.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a biasfast.NoiseSchedule, got {type(schedule).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: unknown {prediction!r}; expected one of {PREDICTIONS}")
    if name not in WEIGHTINGS:
        raise ValueError(f"name: unknown weighting {name!r}; expected one of {WEIGHTINGS}")
    if max_weight is not None:
        _check_positive(max_weight, "max_weight")
    if mean is not None:
        _check_positive(mean, "mean")
    snr = schedule.snr
    if name == "constant":
        if params:
            raise TypeError(f"weighting 'constant': unexpected parameters {sorted(params)}")
        weights = torch.ones_like(snr)
    else:
        weights = _scheme_weights(name, snr, prediction, params)
    if _uses_terminal_guard(name, params):
        weights = torch.where(snr == 0, torch.ones_like(weights), weights)
    elif max_weight is None and not torch.isfinite(weights).all():
        max_weight = weights[torch.isfinite(weights)].max().item()
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    if mean is not None:
        weights = weights * (mean / weights.mean())
    return weights
