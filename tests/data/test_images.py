"""Data loading and the disjoint A/B/test split: the embedded digits, arrays, PNG folders, bad input."""

import numpy as np
import pytest
import torch

from biasfast.data import ImageSet, array_to_images, load_digits, load_images, split_disjoint

pytestmark = pytest.mark.usefixtures("one_thread")



def test_digits_are_the_real_sklearn_images_in_range():
    from sklearn.datasets import load_digits as sk_digits

    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.float32
    assert data.images.min() == -1 and data.images.max() == 1
    raw = torch.from_numpy(sk_digits().images).float()
    torch.testing.assert_close((data.images[:, 0] + 1) * 8, raw, rtol=0, atol=1e-6)
    assert data.labels.tolist() == sk_digits().target.tolist()


def test_split_is_disjoint_seeded_and_sized():
    data = load_digits()
    split = split_disjoint(data, 301, 97, seed=5)
    assert split.train_a.shape == split.train_b.shape == (301, 1, 8, 8) and split.test.shape[0] == 97
    sets = [set(i.tolist()) for i in (split.index_a, split.index_b, split.index_test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    torch.testing.assert_close(split.train_a, data.images[split.index_a])
    assert split.labels_b.tolist() == data.labels[split.index_b].tolist()
    again = split_disjoint(data, 301, 97, seed=5)
    assert torch.equal(again.index_a, split.index_a)
    assert not torch.equal(split_disjoint(data, 301, 97, seed=6).index_a, split.index_a)
    rest = split_disjoint(data, 301, seed=5)
    assert rest.test.shape[0] == 1797 - 602


def test_split_rejects_too_few_images():
    with pytest.raises(ValueError, match="fewer than the split needs"):
        split_disjoint(torch.zeros(10, 1, 8, 8), 4, 3)
    with pytest.raises(ValueError, match="n_test"):
        split_disjoint(torch.zeros(10, 1, 8, 8), 5)
    with pytest.raises(ValueError, match="n_train"):
        split_disjoint(torch.zeros(10, 1, 8, 8), 1)


@pytest.mark.parametrize("layout", ["nhw", "nchw", "nhwc"])
def test_array_layouts_and_ranges(layout, tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(7, 3, 5, 5), dtype=np.uint8)
    array = {"nhw": base[:, 0], "nchw": base, "nhwc": base.transpose(0, 2, 3, 1)}[layout]
    np.save(tmp_path / "x.npy", array)
    images = load_images(str(tmp_path / "x.npy")).images
    expected = torch.from_numpy(base[:, :1] if layout == "nhw" else base).float() / 127.5 - 1
    torch.testing.assert_close(images, expected)
    unit = array_to_images(base.astype(np.float32) / 255)
    torch.testing.assert_close(unit, torch.from_numpy(base).float() / 255 * 2 - 1)


def test_npz_with_labels_resize_and_channels(tmp_path):
    x = np.linspace(-1, 1, 4 * 3 * 6 * 6, dtype=np.float32).reshape(4, 3, 6, 6)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(4))
    data = load_images(str(tmp_path / "d.npz"), image_size=12, channels=1)
    assert data.images.shape == (4, 1, 12, 12) and data.labels.tolist() == [0, 1, 2, 3]
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_png_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(5, 9, 9), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i:02d}.png")
    data = load_images(str(tmp_path))
    torch.testing.assert_close(data.images, torch.from_numpy(pixels).float().unsqueeze(1) / 127.5 - 1)
    Image.fromarray(rng.integers(0, 256, size=(7, 7), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="mixed shapes"):
        load_images(str(tmp_path))
    assert load_images(str(tmp_path), image_size=8, channels=3).images.shape == (6, 3, 8, 8)


def test_bad_input_messages(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_images(str(tmp_path / "missing.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="cannot read"):
        load_images(str(tmp_path / "junk.npy"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_images(str(tmp_path))
    with pytest.raises(ValueError, match=r"\[0, 1\] or \[−1, 1\]"):
        array_to_images(np.full((2, 4, 4), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match="channel axis"):
        array_to_images(np.zeros((2, 5, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        array_to_images(np.full((2, 4, 4), np.nan, dtype=np.float32))
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4)), b=np.zeros(3))
    with pytest.raises(ValueError, match="name the images"):
        load_images(str(tmp_path / "two.npz"))
    with pytest.raises(ValueError, match="channels"):
        load_images(None, channels=2)


def test_imageset_accepts_a_plain_tensor():
    split = split_disjoint(torch.randn(20, 1, 4, 4).clamp(-1, 1), 5, seed=0)
    assert isinstance(ImageSet(split.train_a), ImageSet) and split.labels_a is None
