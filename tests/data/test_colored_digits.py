"""Colored digits: the LfF colouring and attribute rule, unbiased val/test splits, determinism, bad input."""

import pytest
import torch

from biasfast.data.colored_digits import (
    ALIGNED_RATIOS,
    NUM_CLASSES,
    PALETTE,
    ColoredSplit,
    colored_digits,
    colorize,
    grey_digits,
    make_bias_labels,
    read_colour,
)


def test_palette_is_lff_colors_th():
    assert PALETTE.shape == (10, 3)
    torch.testing.assert_close(PALETTE[0], torch.tensor([0.9837, 0.3125, 0.1686]))
    torch.testing.assert_close(PALETTE[9], torch.tensor([0.8337, 0.2024, 0.2669]))


def test_bundled_digits():
    images, labels = grey_digits()
    assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 1
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_make_bias_labels_hand_example():
    # 20 samples of class 3 at ratio 0.55: round(11) aligned, 9 conflicting, one per other colour, in order.
    labels = torch.full((20,), 3)
    bias = make_bias_labels(labels, 0.55)
    assert bias[:11].tolist() == [3] * 11
    assert bias[11:].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    # 4 conflicting over 9 colours: cumulative milestones round(4·k/9) → colours 2, 4, 6, 8 (in other-colour order).
    bias = make_bias_labels(torch.full((14,), 0), 10 / 14)
    assert bias[10:].tolist() == [2, 4, 6, 8]


@pytest.mark.parametrize("ratio", ALIGNED_RATIOS)
def test_train_ratio_and_unbiased_splits(ratio):
    d = colored_digits(ratio, seed=0, repeats=5)
    for c in range(NUM_CLASSES):
        in_class = d.train.labels == c
        n_c = int(in_class.sum())
        n_conf = int((in_class & ~d.train.aligned).sum())
        assert n_conf == n_c - int(ratio * n_c + 0.5) and n_conf >= 1
    # Full-factorial test set: each test digit once per colour, so every (class, colour) cell has the class count.
    cells = torch.bincount(d.test.labels * 10 + d.test.bias_labels, minlength=100).reshape(10, 10)
    assert (cells == cells[:, :1]).all() and cells.sum() == len(d.test) == 10 * 599
    torch.testing.assert_close(d.test.images[0:10].sum(1).bool(), d.test.images[0:1].sum(1).bool().expand(10, 8, 8))
    assert 0.05 < d.val.aligned.float().mean() < 0.2  # uniform colours ⇒ ~10 % aligned
    assert len(d.val) == 180 and len(d.train) == 5 * (1797 - 599 - 180)


def test_colorize_foreground_only_with_small_noise():
    grey = torch.rand(50, 8, 8) * (torch.rand(50, 8, 8) > 0.5)
    colours = torch.randint(0, 10, (50,))
    out = colorize(grey, colours, color_std=0.005, generator=torch.Generator().manual_seed(0))
    assert out.shape == (50, 3, 8, 8)
    assert (out[(grey == 0)[:, None].expand_as(out)] == 0).all()
    ratio = out.sum((2, 3)) / grey.sum((1, 2))[:, None]
    assert (ratio - PALETTE[colours]).abs().max() < 0.03
    assert (colorize(grey, colours, color_std=0.0) == PALETTE[colours][:, :, None, None] * grey[:, None]).all()


def test_deterministic_for_seed():
    a, b, c = (colored_digits(0.95, seed=s, repeats=1) for s in (7, 7, 8))
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
        assert torch.equal(sa.bias_labels, sb.bias_labels)
    assert not torch.equal(a.train.images, c.train.images)


def test_user_images_and_labels():
    grey = torch.rand(300, 6, 6)
    labels = torch.arange(300) % 10
    d = colored_digits(0.9, seed=0, images=grey, labels=labels, repeats=1)
    assert d.train.images.shape[1:] == (3, 6, 6)
    assert len(d.train) + len(d.val) + len(d.test) // 10 == 300
    split = ColoredSplit(d.train.images, d.train.labels)  # bias labels are optional
    with pytest.raises(ValueError, match="bias_labels"):
        split.aligned


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio: .*\(0, 1\)"):
        colored_digits(ratio)


def test_bad_input_messages():
    grey, labels = torch.rand(30, 8, 8), torch.arange(30) % 10
    with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 9\], got range \[0, 10\]"):
        colored_digits(0.9, images=grey, labels=labels.clone().index_fill_(0, torch.tensor([4]), 10))
    with pytest.raises(ValueError, match="labels: 29 entries for 30 images"):
        colored_digits(0.9, images=grey, labels=labels[:29])
    with pytest.raises(ValueError, match="pass both or neither"):
        colored_digits(0.9, images=grey)
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        ColoredSplit(torch.rand(4, 3, 8, 8), torch.zeros(4))
    with pytest.raises(ValueError, match="bias_labels: 3 entries for 4 images"):
        ColoredSplit(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="images: contains NaN"):
        ColoredSplit(torch.full((2, 3, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="ratio"):
        colored_digits("0.9")


def test_read_colour_recovers_bias_labels():
    d = colored_digits(0.95, seed=1, repeats=1)
    assert torch.equal(read_colour(d.test.images), d.test.bias_labels)
