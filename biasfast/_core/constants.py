"""Names that several layers accept as arguments, defined once so every check and error message agrees."""

from __future__ import annotations

import torch

PREDICTIONS = ("epsilon", "sample", "v_prediction")  # what a diffusion model predicts
REDUCTIONS = ("mean", "sum", "none")  # how a per-sample loss is reduced over the batch
SAMPLER_METHODS = ("ddpm", "ddim")  # the fused sampler step's update rules
VARIANCES = ("fixed_small", "learned_range")  # the DDPM step's variance: fixed, or read from the model output
FLOAT_METRICS = ("l2", "sqeuclidean", "cosine", "pearson")  # kNN metrics on floating rows
METRICS = FLOAT_METRICS + ("hamming",)  # every kNN metric (hamming: integer tokens)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what the float kernels read
