"""Sampling loops on the fused step (DDPM, DDIM, DPM-Solver++(2M)), and coupled sampling: several models from
exactly the same noise.

The noise of sample j at step k comes from a generator keyed by (seed, j, k) alone, so a sample does not
depend on the batch size, on its position in a batch, or on which model is sampled: comparing models
(e.g. two trained on disjoint halves of the data) then measures the models, not the noise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from biasfast._core.checks import check_tensor
from biasfast._core.constants import SAMPLER_METHODS, VARIANCES
from biasfast._core.seeds import seed_for
from biasfast.diffusion.dpm_solver import (apply_correction, check_dpm_solver_settings, dpm_solver_timesteps,
                                          second_order_corrections)
from biasfast.diffusion.models import denoise
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.ops.sampler_step import sampler_step

Model = Callable[..., torch.Tensor]
DPM_SOLVER = "dpmsolver++"
LOOP_METHODS = SAMPLER_METHODS + (DPM_SOLVER,)  # the fused step's rules, and the multistep solver built on DDIM
DEFAULT_STEPS = {"ddim": 50, DPM_SOLVER: 20}  # DDPM defaults to every step


def step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    schedule: NoiseSchedule,
    *,
    use_clipped_model_output: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x_t → x_{t_prev} on `schedule`, as diffusers' `DDPMScheduler.step` (fixed_small or learned_range
    variance) / `DDIMScheduler.step`, in one fused pass (the `biasfast::sampler_step` op). Options (method,
    prediction, eta, guidance_scale, uncond_output, noise, clip_sample, variance, return_x0, out) are those of
    `biasfast.ops.sampler_step.sampler_step`; the ᾱ table stays on x_t's device, so no step syncs the host.
    With variance="learned_range" a DDPM step on (t, t_prev) of a respaced chain is guided-diffusion's
    `p_sample` of the respaced process (`SpacedDiffusion`: β' = 1 − ᾱ_t/ᾱ_{t_prev}).

    `use_clipped_model_output` (with `clip_sample`) re-derives ε̂ from the clipped x̂0 before the DDIM update, as
    guided-diffusion's `ddim_sample` always does and diffusers' `DDIMScheduler.step(use_clipped_model_output=True)`
    does on request. Without it, DDIM pairs a clipped x̂0 with the unclipped (guided) ε̂, so x_{t'} leaves the
    line through x_t and x̂0; under strong guidance at high noise that saturates x̂0 to the corners of the
    clip box and fixes wrong colours early (measured in benchmarks/DEBIAS.md). Two fused passes: the first
    yields the guided, clipped x̂0, the second steps with it as an x0-prediction.

    A DDIM step's final target (t_prev = −1) is the schedule's `final_alpha_cumprod` unless the options give one."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a biasfast.NoiseSchedule, got {type(schedule).__name__}")
    check_tensor(x_t, "x_t")
    table = schedule.table(x_t.device, torch.float64)
    if options.get("method", "ddim") == "ddim":
        options.setdefault("final_alpha_cumprod", schedule.final_alpha_cumprod)
    if not use_clipped_model_output:
        return sampler_step(x_t, model_output, t, t_prev, table, **options)
    if options.get("clip_sample") is None:
        raise ValueError("use_clipped_model_output: needs clip_sample (there is no clipped x̂0 without it)")
    out, return_x0 = options.pop("out", None), options.pop("return_x0", False)
    _, x0 = sampler_step(x_t, model_output, t, t_prev, table, return_x0=True, **options)
    return sampler_step(x_t, x0, t, t_prev, table, method=options.get("method", "ddim"), prediction="sample",
                        eta=options.get("eta", 0.0), noise=options.get("noise"), return_x0=return_x0, out=out,
                        final_alpha_cumprod=options.get("final_alpha_cumprod", 1.0))


def keyed_normal(seed: int, indices: range, step_index: int, shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise for samples `indices` at `step_index`: row j is drawn from its own keyed generator
    (in float32 on the CPU, so the noise is the same on every device and dtype)."""
    generator = torch.Generator()
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for row, index in enumerate(indices):
        generator.manual_seed(seed_for(seed, index, step_index))
        torch.randn(shape, generator=generator, out=out[row])
    return out.to(device=device, dtype=dtype)


def sample(
    model: Model,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    method: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float | None = None,
    class_labels: int | torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    **options,
) -> torch.Tensor:
    """Draw shape[0] samples of shape[1:] from `model(x, t, class_labels=None)`; see `sample_coupled`."""
    if len(shape) < 2:
        raise ValueError(f"shape: expected (n, *sample_shape), got {tuple(shape)}")
    return sample_coupled([model], shape[0], tuple(shape[1:]), schedule, steps=steps, method=method, eta=eta,
                          guidance_scale=guidance_scale, class_labels=class_labels, seed=seed,
                          batch_size=batch_size, progress=progress, **options)[0]


def sample_coupled(
    models: Sequence[Model],
    n: int,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    seed: int = 0,
    first_index: int = 0,
    steps: int | None = None,
    method: str = "ddim",
    eta: float = 0.0,
    prediction: str | None = None,
    guidance_scale: float | None = None,
    class_labels: int | torch.Tensor | None = None,
    null_label: int | None = None,
    clip_sample: float | None = None,
    variance: str = "fixed_small",
    use_clipped_model_output: bool = False,
    spacing: str | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[torch.Tensor]:
    """n samples of `shape` from each model, sample j of every model from the same x_T and per-step noise.

    `model(x, t, class_labels)` returns the prediction (`prediction`: epsilon, sample or v_prediction) for x
    (B, *shape) at integer timesteps t (B,) (diffusers models work as they are: `models.denoise`); with variance="learned_range" it returns (B, 2C, ...), the
    prediction then the variance interpolation v of a model trained with learned variances (guided-diffusion's
    `learn_sigma=True`): DDPM samples with that variance, DDIM and DPM-Solver++ use the prediction only.
    With `guidance_scale` s (diffusers' convention; s = 1 + w for Ho & Salimans' w), each step calls the
    model with `class_labels` and with None, or once on a doubled batch whose second half is labelled
    `null_label` when one is given. method "ddpm", "ddim" or "dpmsolver++" (DPM-Solver++(2M), equal to
    diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` with its defaults;
    see `biasfast.diffusion.dpm_solver`). Timesteps: `spacing`, else the schedule's (a diffusers scheduler's
    `timestep_spacing` and `steps_offset`), else each sampler's diffusers default ("leading" for DDPM and DDIM,
    `schedule.timesteps`; "linspace" for DPM-Solver++, whose spacings follow DPMSolverMultistepScheduler's own
    rules, `dpm_solver_timesteps`), each step going to the next one (-1 last); steps defaults to 50 for DDIM,
    20 for DPM-Solver++, every step for DDPM.
    `clip_sample` clamps x̂0; with `use_clipped_model_output` ε̂ is re-derived from the clipped x̂0 (see `step`).
    `prediction`, `spacing` and `clip_sample` default to the schedule's (a diffusers scheduler's config).
    The noise of sample j depends only on (seed, first_index + j, step), so results do not depend on `batch_size`,
    and n samples made in pieces (each piece passing the global index of its first sample) equal one call's, up
    to the model's own rounding: a network's float32 output may differ by an ulp with the batch it sees (oneDNN
    picks convolution kernels by shape; a diffusers UNet on an AMD EPYC), so bitwise equality needs equal batches.
    """
    models = list(models)
    if not models or not all(callable(m) for m in models):
        raise TypeError("models: expected a non-empty sequence of callables model(x, t, class_labels)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"first_index: expected a non-negative int, got {first_index!r}")
    shape = tuple(shape)
    if method not in LOOP_METHODS:
        raise ValueError(f"method: unknown {method!r}; expected one of {LOOP_METHODS}")
    if variance not in VARIANCES:
        raise ValueError(f"variance: unknown {variance!r}; expected one of {VARIANCES}")
    multistep = method == DPM_SOLVER
    if multistep and eta != 0.0:
        raise ValueError(f"eta: DPM-Solver++ is deterministic here (eta must be 0, got {eta!r})")
    if multistep and clip_sample is not None:
        raise ValueError("clip_sample: not supported with method='dpmsolver++' (its update assumes the unclipped "
                         "data prediction; diffusers offers thresholding there instead)")
    batch_size = n if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    labels = _labels(class_labels, n, guidance_scale)
    device = torch.device(device) if device is not None else _model_device(models[0])
    if steps is None:
        steps = min(DEFAULT_STEPS.get(method, schedule.num_timesteps), schedule.num_timesteps)
    prediction = schedule.prediction if prediction is None else prediction
    # DPMSolverMultistepScheduler has no clip_sample: a schedule read from a DDPM/DDIM scheduler that clips still
    # samples unclipped with DPM-Solver++, as diffusers' DPM scheduler made from that config does
    clip_sample = None if multistep else (schedule.clip_sample if clip_sample is None else clip_sample)
    if multistep:
        check_dpm_solver_settings(schedule)
        timesteps = dpm_solver_timesteps(schedule, steps, spacing)
    else:
        timesteps = schedule.timesteps(steps, spacing).tolist()
    pairs = list(zip(timesteps, schedule.previous_timesteps(timesteps, method)))
    corrections = second_order_corrections(schedule, timesteps) if multistep else None
    noisy = method == "ddpm" or eta > 0
    config = dict(method="ddim" if multistep else method, prediction=prediction, eta=eta,
                  guidance_scale=guidance_scale, clip_sample=clip_sample, variance=variance, return_x0=multistep,
                  use_clipped_model_output=use_clipped_model_output)
    if multistep:  # DPM-Solver++ ends at σ = 0 (diffusers' final_sigmas_type="zero"), whatever set_alpha_to_one says
        config["final_alpha_cumprod"] = 1.0

    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    batches = range(0, n, batch_size)
    bar = tqdm(total=len(batches) * len(pairs), disable=not progress, desc="sampling", unit="step")
    with torch.no_grad():
        for start in batches:
            stop = min(n, start + batch_size)
            indices = range(first_index + start, first_index + stop)  # the noise keys: global sample indices
            batch_labels = None if labels is None else labels[start:stop].to(device)
            x_T = keyed_normal(seed, indices, 0, shape, device, dtype)
            xs = [x_T.clone() for _ in models]
            previous_x0: list[torch.Tensor | None] = [None for _ in models]  # DPM-Solver++'s m1
            for k, (t, t_prev) in enumerate(pairs):
                noise = keyed_normal(seed, indices, k + 1, shape, device, dtype) if noisy else None
                t_batch = torch.full((len(indices),), t, dtype=torch.int64, device=device)
                for m, model in enumerate(models):
                    cond, uncond = _predict(model, xs[m], t_batch, batch_labels, guidance_scale, null_label)
                    result = step(xs[m], cond, t_batch, t_prev, schedule, uncond_output=uncond, noise=noise,
                                  out=xs[m], **config)
                    if multistep:  # the DDIM step wrote xs[m]; add the second-order term
                        apply_correction(xs[m], result[1], previous_x0[m], corrections[k])
                        previous_x0[m] = result[1]
                bar.update(1)
            for m in range(len(models)):
                outputs[m].append(xs[m])
    bar.close()
    return [torch.cat(chunks) for chunks in outputs]


def _labels(class_labels, n: int, guidance_scale: float | None) -> torch.Tensor | None:
    if class_labels is None:
        if guidance_scale is not None:
            raise ValueError("class_labels: required with guidance_scale (classifier-free guidance)")
        return None
    if isinstance(class_labels, int) and not isinstance(class_labels, bool):
        return torch.full((n,), class_labels, dtype=torch.int64)
    if isinstance(class_labels, torch.Tensor) and class_labels.shape[:1] == (n,):
        return class_labels
    raise ValueError(f"class_labels: expected an int or a tensor with {n} rows, got {class_labels!r:.80}")


def _model_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def _predict(model: Model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
             guidance_scale: float | None, null_label: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conditional, unconditional) outputs; unconditional only with guidance."""
    if guidance_scale is None:
        return denoise(model, x, t, labels), None
    if null_label is None:
        return denoise(model, x, t, labels), denoise(model, x, t, None)
    both = denoise(model, torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([labels, torch.full_like(labels, null_label)]))
    return both.chunk(2)
