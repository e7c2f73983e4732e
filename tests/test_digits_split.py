"""The digits split is fixed (golden labels) and a partition: train and held-out are disjoint and together
are the whole dataset."""

import torch

from stepdistill.data.digits import load_digits_tensor


def rows(x, y):
    return sorted((int(label), img.numpy().tobytes()) for img, label in zip(x, y))


def test_split_is_fixed_and_disjoint():
    xa, ya = load_digits_tensor(8, "all")
    xt, yt = load_digits_tensor(8, "train")
    xh, yh = load_digits_tensor(8, "heldout")
    assert (len(yt), len(yh), len(ya)) == (1500, 297, 1797)
    assert sorted(rows(xt, yt) + rows(xh, yh)) == rows(xa, ya)  # a partition
    assert yh[:12].tolist() == [6, 5, 4, 0, 5, 3, 0, 5, 3, 4, 0, 2]  # golden: the split never moves
    assert torch.bincount(yh).tolist() == [30, 32, 28, 41, 30, 28, 30, 23, 32, 23]
    x16, y16 = load_digits_tensor(16, "heldout")
    assert torch.equal(y16, yh) and x16.shape == (297, 1, 16, 16) and x16.min() >= -1 and x16.max() <= 1
