"""`biasfast::sampler_step`: the fused DDPM/DDIM sampler step with classifier-free guidance, one pass over x_t
and the model outputs; the overload `sampler_step.out` writes into a given tensor (x_t itself: in place).
With `variance="learned_range"` the model outputs carry a learned variance in their second half (B, 2C, ...),
read in place by the kernel (no split copies), as guided-diffusion's models with `learn_sigma=True` emit it.

Coefficients are gathered from the device-resident ᾱ table inside the kernel with per-sample timesteps, so a
sampling loop never calls `.item()` and, on CUDA, is capturable in a CUDA graph. Sampling is inference-only:
no autograd formula.
"""

from __future__ import annotations

import torch

from biasfast._core import dispatch
from biasfast._core.checks import check_floating, check_tensor
from biasfast._core.constants import PREDICTIONS, SAMPLER_METHODS, VARIANCES


def sampler_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    method: str = "ddim",
    prediction: str = "epsilon",
    eta: float = 0.0,
    guidance_scale: float | None = None,
    uncond_output: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    clip_sample: float | None = None,
    variance: str = "fixed_small",
    final_alpha_cumprod: float = 1.0,
    return_x0: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x_t → x_{t_prev}, as diffusers' `DDPMScheduler.step` (fixed_small or learned_range variance) /
    `DDIMScheduler.step`.

    t, t_prev: ints or integer tensors of shape () or (B,) (per-sample timesteps); t_prev = -1 is the final
    step, to ᾱ_prev = `final_alpha_cumprod` (diffusers' DDIMScheduler: 1, or ᾱ_0 with `set_alpha_to_one=False`).
    method "ddpm" (ancestral) or "ddim" (with `eta` in [0, 1]); prediction "epsilon", "sample" or "v_prediction".
    Guidance: `model_output` is the conditional output and the model output used is
    uncond + guidance_scale·(cond − uncond) (diffusers' convention; Ho & Salimans' (1 + w)·ε_c − w·ε_u is
    guidance_scale = 1 + w). `noise` (like x_t) is required for "ddpm" and for eta > 0. `clip_sample` clamps
    x̂0 to ±clip_sample. `alphas_cumprod`: the float64 ᾱ table on x_t's device (`NoiseSchedule.table`).
    `variance`: "fixed_small", or "learned_range": `model_output` (and `uncond_output`) are (B, 2C, ...) for x_t
    (B, C, ...), the prediction then v ∈ [−1, 1], and the DDPM step draws with log σ² = frac·log β' +
    (1 − frac)·log β̃', frac = (v + 1)/2, β' = 1 − ᾱ_t/ᾱ_{t_prev} and β̃' = (1 − ᾱ_{t_prev})/(1 − ᾱ_t)·β' the
    step's posterior variance (clamped ≥ 1e-20), i.e. guided-diffusion's `p_sample` on the respaced process
    whose steps are (t, t_prev) (`SpacedDiffusion`), and diffusers' `variance_type="learned_range"`. Guidance
    mixes the predictions only; v comes from the conditional output. DDIM ignores v. `out`: a contiguous
    tensor like x_t to write x_prev into, x_t itself for an in-place step (saves the allocation, which for
    large batches costs as much as the step). Returns x_prev, or (x_prev, x̂0) with `return_x0`.
    """
    _check_arguments(x_t, model_output, uncond_output, noise, method, prediction, eta, guidance_scale, clip_sample,
                     variance)
    check_tensor(alphas_cumprod, "alphas_cumprod")
    if isinstance(final_alpha_cumprod, bool) or not isinstance(final_alpha_cumprod, (int, float)) or not (
            0.0 < final_alpha_cumprod <= 1.0):
        raise ValueError(f"final_alpha_cumprod: expected a number in (0, 1], got {final_alpha_cumprod!r}")
    if alphas_cumprod.dtype != torch.float64 or alphas_cumprod.dim() != 1 or alphas_cumprod.device != x_t.device:
        raise ValueError(f"alphas_cumprod: expected a 1-D float64 table on {x_t.device}, got {alphas_cumprod.dtype} "
                         f"of shape {tuple(alphas_cumprod.shape)} on {alphas_cumprod.device}")
    batch, steps = x_t.shape[0], alphas_cumprod.shape[0]
    if isinstance(t, int) and isinstance(t_prev, int) and not t_prev < t:  # also for an empty batch
        raise ValueError(f"t_prev: values must satisfy -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
    t = _timestep_tensor(t, "t", batch, x_t.device, steps)
    t_prev = _timestep_tensor(t_prev, "t_prev", batch, x_t.device, steps)
    _check_order(t, t_prev, steps, alphas_cumprod, float(final_alpha_cumprod))
    operator = dispatch.op("sampler_step")
    args = (x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, float(eta),
            _optional_float(guidance_scale), _optional_float(clip_sample))
    if out is None:
        dispatch.require_kernel("sampler_step", x_t, "x_t")
        x_prev, x0 = operator(*args, return_x0, variance, float(final_alpha_cumprod))
    else:
        dispatch.require_kernel("sampler_step.out", x_t, "x_t")
        _check_out(out, x_t)
        x_prev, x0 = out, (torch.empty_like(out) if return_x0 else out.new_empty((0,)))
        operator.out(*args, x_prev, x0, variance, float(final_alpha_cumprod))
    return (x_prev, x0) if return_x0 else x_prev


def _check_out(out: torch.Tensor, x_t: torch.Tensor) -> None:
    check_tensor(out, "out")
    if out.shape != x_t.shape or out.dtype != x_t.dtype or out.device != x_t.device:
        raise ValueError(f"out: expected shape {tuple(x_t.shape)}, {x_t.dtype} on {x_t.device}, got "
                         f"{tuple(out.shape)}, {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def model_output_shape(x_t: torch.Tensor, variance: str) -> tuple[int, ...]:
    """The model output's shape for x_t: x_t's, or with the channels doubled for a learned variance."""
    shape = tuple(x_t.shape)
    return shape if variance == "fixed_small" else (shape[0], 2 * shape[1], *shape[2:])


def _check_arguments(x_t, model_output, uncond_output, noise, method, prediction, eta, guidance_scale, clip_sample,
                     variance):
    check_tensor(x_t, "x_t")
    check_floating(x_t, "x_t")
    if x_t.dim() < 1:
        raise ValueError("x_t: expected a batch dimension (shape (B, ...))")
    if variance not in VARIANCES:
        raise ValueError(f"variance: unknown {variance!r}; expected one of {VARIANCES}")
    if variance == "learned_range" and x_t.dim() < 2:
        raise ValueError("x_t: a learned variance needs a channel dimension (shape (B, C, ...))")
    model_shape = model_output_shape(x_t, variance)
    for name, value in (("model_output", model_output), ("uncond_output", uncond_output), ("noise", noise)):
        if value is None and name != "model_output":
            continue
        check_tensor(value, name)
        expected = tuple(x_t.shape) if name == "noise" else model_shape
        if tuple(value.shape) != expected:
            what = "x_t's" if expected == tuple(x_t.shape) else "x_t's with 2C channels (prediction, learned variance)"
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match {expected}, {what}")
        if value.dtype != x_t.dtype:
            raise TypeError(f"{name}: dtype {value.dtype} does not match x_t's {x_t.dtype}")
        if value.device != x_t.device:
            raise ValueError(f"{name}: on {value.device}, but x_t is on {x_t.device}")
    if method not in SAMPLER_METHODS:
        raise ValueError(f"method: unknown {method!r}; expected one of {SAMPLER_METHODS}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: unknown {prediction!r}; expected one of {PREDICTIONS}")
    if guidance_scale is not None and uncond_output is None:
        raise ValueError("uncond_output: required when guidance_scale is set (classifier-free guidance)")
    if uncond_output is not None and guidance_scale is None:
        raise ValueError("guidance_scale: required when uncond_output is given")
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a number in [0, 1], got {eta!r}")
    if method == "ddpm" and eta != 0.0:
        raise ValueError("eta: only used by method='ddim'; DDPM's variance is fixed_small")
    if noise is None and (method == "ddpm" or eta > 0):
        raise ValueError(f"noise: required when method is 'ddpm' or eta > 0 (method={method!r}, eta={eta})")
    if clip_sample is not None and not (isinstance(clip_sample, (int, float)) and clip_sample > 0):
        raise ValueError(f"clip_sample: expected a positive bound or None, got {clip_sample!r}")


def _timestep_tensor(value, name: str, batch: int, device: torch.device, steps: int) -> torch.Tensor:
    """(B,) int64 timesteps on `device`; Python ints become a fill (no host-to-device copy, capturable)."""
    low = -1 if name == "t_prev" else 0
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise TypeError(f"{name}: expected an int or an integer tensor, got {type(value).__name__}")
    if isinstance(value, int):
        if not low <= value < steps:
            raise ValueError(f"{name}: {value} is outside [{low}, {steps})")
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name}: expected shape () or ({batch},), got {tuple(value.shape)}")
    value = value.to(device=device, dtype=torch.int64)
    return value.expand(batch) if value.dim() == 0 else value


def _check_order(t: torch.Tensor, t_prev: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor,
                 final_alpha_cumprod: float) -> None:
    """Range checks; on CUDA or under torch.compile as asynchronous device asserts (no host sync)."""
    checks = [
        ((t >= 0) & (t < steps), f"t: values must lie in [0, {steps})"),
        ((t_prev >= -1) & (t_prev < t), "t_prev: values must satisfy -1 <= t_prev < t"),
    ]
    if final_alpha_cumprod < 1.0:  # ᾱ ≤ 1 always: the default needs no gather
        alpha = alphas_cumprod[t.clamp(0, steps - 1)]
        checks.append(((t_prev >= 0) | (alpha <= final_alpha_cumprod),
                       f"final_alpha_cumprod: {final_alpha_cumprod} is below alphas_cumprod at a final step's t "
                       "(the final step must denoise)"))
    eager_host = t.device.type == "cpu" and not torch.compiler.is_compiling()
    for ok, message in checks:
        if eager_host:
            if not bool(ok.all()):
                raise ValueError(message)
        else:
            torch._assert_async(ok.all(), message)


def _fake(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
          guidance_scale, clip_sample, return_x0, variance="fixed_small", final_alpha_cumprod=1.0):
    torch._check(tuple(model_output.shape) == model_output_shape(x_t, variance),
                 lambda: "sampler_step: model_output must have x_t's shape (2C channels for learned_range)")
    x_prev = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x_prev) if return_x0 else x_t.new_empty((0,))
    return x_prev, x0


def _out_fake(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
              guidance_scale, clip_sample, out, x0_out, variance="fixed_small", final_alpha_cumprod=1.0):
    torch._check(out.shape == x_t.shape, lambda: "sampler_step.out: out must have x_t's shape")


def register() -> None:
    torch.library.register_fake("biasfast::sampler_step")(_fake)
    torch.library.register_fake("biasfast::sampler_step.out")(_out_fake)
    dispatch.register_triton("sampler_step", "biasfast.kernels.sampler_step", "sampler_step")
    dispatch.register_triton("sampler_step.out", "biasfast.kernels.sampler_step", "sampler_step_out")
