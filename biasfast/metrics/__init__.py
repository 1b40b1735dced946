"""Memorization and bias measures of the biased-generalization paper: `bias_score` (sample level: own vs cross
nearest neighbours, pair distance, f_mem, NN divergence), `denoiser_agreement` (score level, the paper's Fig. 2),
`BiasTracker` (both across checkpoints: τ_bias, τ_test, the biased window), sample quality and statistics."""

from biasfast.metrics.agreement import DenoiserAgreement, denoiser_agreement
from biasfast.metrics.bias import BiasReport, PairDistance, bias_score
from biasfast.metrics.pair import evaluate_pair
from biasfast.metrics.tracker import BiasTracker

__all__ = ["BiasReport", "BiasTracker", "DenoiserAgreement", "PairDistance", "bias_score", "denoiser_agreement",
           "evaluate_pair"]
