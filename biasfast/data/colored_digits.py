"""Colored digits: a Colored-MNIST-style bias benchmark built offline from scikit-learn's bundled 8×8 digits.

The foreground of each digit takes a colour from the LfF palette; in training the colour equals the class for
a fraction `ratio` of each class (LfF `make_attr_labels`), so colour is a shortcut. Validation is unbiased
(uniform random colours) and the test set renders every test image in all 10 colours, so each (class, colour)
cell has the same support. Bias labels (the colour index) are returned for evaluation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from biasfast.data.images import load_digits

NUM_CLASSES = 10
ALIGNED_RATIOS = (0.95, 0.98, 0.99, 0.995)

# LfF `data/resource/colors.th`, RGB in [0, 1] (decoded in ../shared/notes/debiasing.md §3.1).
PALETTE = torch.tensor(
    [
        [0.9837, 0.3125, 0.1686],
        [0.9905, 0.9156, 0.3515],
        [0.6730, 0.4611, 0.5798],
        [0.7833, 0.8316, 0.6013],
        [0.0880, 0.7780, 0.9818],
        [0.3214, 0.9611, 0.4464],
        [0.0246, 0.2357, 0.7587],
        [0.5552, 0.1016, 0.7618],
        [0.2077, 0.3929, 0.0187],
        [0.8337, 0.2024, 0.2669],
    ],
    dtype=torch.float32,
)


@dataclass(frozen=True)
class ColoredSplit:
    """Images (n, C, H, W) float32, labels (n,) int64 and bias labels (n,) int64 or None (evaluation only)."""

    images: torch.Tensor
    labels: torch.Tensor
    bias_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_labelled_images(self.images, self.labels, self.bias_labels)

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def aligned(self) -> torch.Tensor:
        """Boolean mask of bias-aligned samples (bias label == class label)."""
        if self.bias_labels is None:
            raise ValueError("bias_labels: this split has none, so aligned/conflicting is unknown")
        return self.labels == self.bias_labels


@dataclass(frozen=True)
class ColoredDigits:
    """Biased training split, unbiased validation split and full-factorial unbiased test split."""

    train: ColoredSplit
    val: ColoredSplit
    test: ColoredSplit
    ratio: float
    seed: int


def check_labelled_images(
    images: object, labels: object, bias_labels: object = None, num_classes: int = NUM_CLASSES
) -> None:
    """Clear errors for the inputs users pass: types, shapes, counts, label ranges, finiteness."""
    for name, value in (("images", images), ("labels", labels), ("bias_labels", bias_labels)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a floating-point tensor, got dtype {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(f"images: expected shape (n, H, W) or (n, C, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images: contains NaN or Inf")
    for name, value in (("labels", labels), ("bias_labels", bias_labels)):
        if value is not None:
            check_labels(value, name, images.shape[0], num_classes)


def check_labels(value: torch.Tensor, name: str, n: int | None = None, num_classes: int = NUM_CLASSES) -> None:
    """Integer 1-D labels in [0, num_classes), with n entries when n is given."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(value.shape)}")
    if n is not None and value.numel() != n:
        raise ValueError(f"{name}: {value.numel()} entries for {n} images (counts must match)")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= num_classes):
        raise ValueError(
            f"{name}: values must lie in [0, {num_classes - 1}], got range [{int(value.min())}, {int(value.max())}]"
        )


def check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio: expected a float in (0, 1), got {type(ratio).__name__}")
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio: the bias-aligned ratio must lie strictly inside (0, 1), got {ratio}")
    return float(ratio)


def grey_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (no download) as images (1797, 8, 8) in [0, 1] (LfF's scale) and labels."""
    digits = load_digits()
    return (digits.images[:, 0] + 1) / 2, digits.labels


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_bias_labels(labels: torch.Tensor, ratio: float, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """LfF `make_attr_labels`: per class, the first round(ratio·n_c) samples (in the given order) take the
    class colour; the rest are spread evenly over the other colours with cumulative-milestone rounding."""
    ratio = check_ratio(ratio)
    check_labels(labels, "labels", num_classes=num_classes)
    bias = labels.clone()
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        n_aligned = _round_half_up(ratio * idx.numel())
        conflicting = idx[n_aligned:]
        others = [k for k in range(num_classes) if k != c]
        n_conf = conflicting.numel()
        start = 0
        for j, colour in enumerate(others):
            end = _round_half_up(n_conf * (j + 1) / len(others))
            bias[conflicting[start:end]] = colour
            start = end
    return bias


def colorize(
    images: torch.Tensor, colours: torch.Tensor, *, color_std: float = 0.005, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LfF foreground rule: clamp(palette[colour] + N(0, 1)·color_std, 0, 1) × grey image → (n, 3, H, W)."""
    check_labelled_images(images, colours)
    if images.dim() == 4:
        if images.shape[1] != 1:
            raise ValueError(f"images: colorize needs grey images (n, H, W) or (n, 1, H, W), got {tuple(images.shape)}")
        images = images[:, 0]
    if color_std < 0:
        raise ValueError(f"color_std: must be >= 0, got {color_std}")
    noise = torch.randn(colours.numel(), 3, generator=generator) * color_std
    rgb = (PALETTE[colours] + noise).clamp(0.0, 1.0)
    return rgb[:, :, None, None] * images.to(torch.float32)[:, None]


def read_colour(images: torch.Tensor) -> torch.Tensor:
    """Nearest palette colour (cosine of the summed RGB) of coloured images (n, 3, H, W): a diagnostic of how
    bias-aligned generated images are."""
    rgb = torch.nn.functional.normalize(images.sum((2, 3)), dim=1)
    return (rgb @ torch.nn.functional.normalize(PALETTE, dim=1).T).argmax(1)


def colored_digits(
    ratio: float = 0.99,
    *,
    seed: int = 0,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    test_fraction: float = 1 / 3,
    val_fraction: float = 0.1,
    repeats: int = 5,
    color_std: float = 0.005,
) -> ColoredDigits:
    """Build the benchmark from grey `images`/`labels` (default: scikit-learn's digits), deterministic for `seed`.

    Each training image is rendered `repeats` times (independent colour draws) so that even at ratio 0.995 every
    class holds a few bias-conflicting samples (~100 digits per class otherwise round to zero conflicting).
    """
    ratio = check_ratio(ratio)
    if (images is None) != (labels is None):
        raise ValueError("images, labels: pass both or neither")
    if images is None:
        images, labels = grey_digits()
    check_labelled_images(images, labels)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    for name, frac in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name}: must lie in (0, 1), got {frac}")
    n = labels.numel()
    n_test, n_val = _round_half_up(n * test_fraction), _round_half_up(n * val_fraction)
    if n - n_test - n_val < NUM_CLASSES:
        raise ValueError(f"images: {n} images are too few for the test/val fractions ({test_fraction}, {val_fraction})")

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]

    train_idx = train_idx.repeat(repeats)[torch.randperm(train_idx.numel() * repeats, generator=gen)]
    train_labels = labels[train_idx]
    train_bias = make_bias_labels(train_labels, ratio)
    train = ColoredSplit(colorize(images[train_idx], train_bias, color_std=color_std, generator=gen),
                         train_labels, train_bias)

    val_labels = labels[val_idx]
    val_bias = torch.randint(0, NUM_CLASSES, (n_val,), generator=gen)
    val = ColoredSplit(colorize(images[val_idx], val_bias, color_std=color_std, generator=gen), val_labels, val_bias)

    test_images = images[test_idx].repeat_interleave(NUM_CLASSES, dim=0)
    test_bias = torch.arange(NUM_CLASSES).repeat(n_test)
    test = ColoredSplit(colorize(test_images, test_bias, color_std=color_std, generator=gen),
                        labels[test_idx].repeat_interleave(NUM_CLASSES), test_bias)
    return ColoredDigits(train=train, val=val, test=test, ratio=ratio, seed=seed)
