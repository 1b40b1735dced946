"""Datasets for the main job and the debiasing recipes: (N, C, H, W) float32 tensors in [−1, 1]."""

from biasfast.data.images import (
    DisjointSplit,
    ImageSet,
    array_to_images,
    load_digits,
    load_images,
    load_mnist,
    split_disjoint,
)

__all__ = ["DisjointSplit", "ImageSet", "array_to_images", "load_digits", "load_images", "load_mnist",
           "split_disjoint"]
# Other dataset modules add their import and __all__ entry below this line.
from biasfast.data.colored_digits import ColoredDigits, ColoredSplit, colored_digits  # noqa: E402

__all__ += ["ColoredDigits", "ColoredSplit", "colored_digits"]
