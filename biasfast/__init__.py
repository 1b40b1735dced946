"""biasfast: fast, exact tools for finding and fixing bias in diffusion models."""

from biasfast import _extension, _ops  # noqa: F401  (load the compiled ops, register fakes/autograd)
from biasfast import kernels, reference  # noqa: F401
from biasfast import schedules  # noqa: F401
from biasfast.distances import pairwise_distances, sqdist
from biasfast.knn import knn
from biasfast import distributed  # noqa: F401
from biasfast.buildinfo import info as _info_text
from biasfast.schedules import NoiseSchedule
from biasfast import nn  # noqa: F401
from biasfast.losses import snr_weighted_loss
from biasfast.weighting import weighting
from biasfast import sampling  # noqa: F401
from biasfast.samplers import sample, sample_coupled
from biasfast import metrics  # noqa: F401
from biasfast.bias import BiasReport, bias_score
from biasfast.rowhash import row_hash

__version__ = "0.1.0"


def info() -> str:
    """Describe the build (versions, compiled extension, CPU/GPU, implementation per op) and print it."""
    text = _info_text()
    print(text)
    return text


__all__ = ["BiasReport", "NoiseSchedule", "bias_score", "distributed", "info", "knn", "pairwise_distances", "row_hash",
           "sample", "sample_coupled", "snr_weighted_loss", "sqdist", "weighting"]
