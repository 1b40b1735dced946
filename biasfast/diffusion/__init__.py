"""Diffusion training and sampling: noise schedules, loss weightings (Unmasking Bias), the fused losses as
modules, the sampling loops on the fused step, the denoiser models and the resumable trainer."""

from biasfast.diffusion.sampling import sample, sample_coupled, step
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.diffusion.weighting import weighting

__all__ = ["NoiseSchedule", "sample", "sample_coupled", "step", "weighting"]
