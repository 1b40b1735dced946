"""biasfast: fast, exact tools for finding and fixing bias in diffusion models.

Importing the package loads only the bottom layers (the compiled ops with their fakes, autograd formulas and
Triton registrations); every public name below loads its module on first use, so `import biasfast` never loads
the applications, matplotlib or the data sets. ARCHITECTURE.md is the map.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

from biasfast import ops  # noqa: F401  (registers the compiled ops' fakes, autograd and Triton kernels)

__version__ = "0.1.0"

# public name -> module defining it
_PUBLIC = {
    "BiasReport": "biasfast.metrics.bias",
    "bias_score": "biasfast.metrics.bias",
    "evaluate_pair": "biasfast.metrics.pair",
    "FilteredHierarchicalModel": "biasfast.hierarchy.model",
    "hybrid_loss": "biasfast.ops.hybrid_loss",
    "NoiseSchedule": "biasfast.diffusion.schedules",
    "knn": "biasfast.neighbors.knn",
    "pairwise_distances": "biasfast.neighbors.distances",
    "row_hash": "biasfast.ops.row_hash",
    "sample": "biasfast.diffusion.sampling",
    "sample_coupled": "biasfast.diffusion.sampling",
    "snr_weighted_loss": "biasfast.ops.snr_loss",
    "sqdist": "biasfast.ops.sqdist",
    "weighting": "biasfast.diffusion.weighting",
}

# Public namespaces (`biasfast.sampling.step`, `biasfast.nn.SNRWeightedLoss`, `biasfast.distributed.knn`) and, for
# one release, the 0.1 module paths that user code imports (`from biasfast.models import build_model`; models,
# training, schedules and reference go in 0.2): each is the very module of its home, under a second name.
_ALIASES = {
    "biasfast.distributed": "biasfast.neighbors.distributed",
    "biasfast.models": "biasfast.diffusion.models",
    "biasfast.nn": "biasfast.diffusion.losses",
    "biasfast.reference": "biasfast.ops.reference",
    "biasfast.sampling": "biasfast.diffusion.sampling",
    "biasfast.schedules": "biasfast.diffusion.schedules",
    "biasfast.training": "biasfast.diffusion.training",
}

_SUBPACKAGES = ("apps", "data", "debias", "diffusion", "hierarchy", "kernels", "metrics", "neighbors", "ops")


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module path as the very module object of its new home (one module, two names)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _ALIASES:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(_ALIASES[fullname]))
        return None


sys.meta_path.append(_AliasFinder())


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif f"biasfast.{name}" in _ALIASES or name in _SUBPACKAGES:
        value = importlib.import_module(f"biasfast.{name}")
    else:
        raise AttributeError(f"module 'biasfast' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | {a.rsplit(".", 1)[1] for a in _ALIASES} | set(_SUBPACKAGES))


def info() -> str:
    """Describe the build (versions, compiled extension, CPU/GPU, the kernel each op runs) and print it."""
    from biasfast._core.buildinfo import info as build_report

    text = build_report()
    print(text)
    return text


__all__ = ["BiasReport", "FilteredHierarchicalModel", "NoiseSchedule", "bias_score", "distributed", "evaluate_pair",
           "hybrid_loss", "info", "knn", "pairwise_distances", "row_hash", "sample", "sample_coupled",
           "snr_weighted_loss", "sqdist", "weighting"]
