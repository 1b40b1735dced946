"""The filtered hierarchical data model, its exact belief-propagation denoiser, Gaussian one-hot diffusion on it
and the bias-mechanism experiments of the biased-generalization paper."""

from biasfast.ops.tree_bp import tree_bp
from biasfast.hierarchy.denoiser import SequenceDenoiser
from biasfast.hierarchy.diffusion import OneHotDiffusion, bp_estimate, network_estimate
from biasfast.hierarchy.model import FilteredHierarchicalModel
from biasfast.hierarchy.train import PairConfig, PairTrainer

__all__ = ["FilteredHierarchicalModel", "OneHotDiffusion", "PairConfig", "PairTrainer", "SequenceDenoiser",
           "bp_estimate", "network_estimate", "tree_bp"]
