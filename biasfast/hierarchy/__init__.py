"""The filtered hierarchical data model and its exact belief-propagation denoiser (issue 8)."""

from biasfast.hierarchy.bp import tree_bp
from biasfast.hierarchy.model import FilteredHierarchicalModel

__all__ = ["FilteredHierarchicalModel", "tree_bp"]
