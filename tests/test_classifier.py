"""The digit classifier: shapes, RGB / size handling, augmentation, save/load, the classifier method on the
shared loop, and the shipped asset's held-out accuracy (>= 97%)."""

import pytest
import torch

from stepdistill.classifier import DigitClassifier, accuracy, augment, load_classifier, save_classifier
from stepdistill.config import validate
from stepdistill.data.digits import load_digits_tensor
from stepdistill.errors import UsageError
from stepdistill.trainers import Trainer, method_class


def tiny():
    torch.manual_seed(0)
    return DigitClassifier(channels=(4, 8), hidden=16).eval()


def test_shapes_and_rgb_input():
    net = tiny()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    assert net.features(x).shape == (5, 16) and net.num_features == 16
    assert net.logits(x).shape == (5, 10) and net.predict(x).shape == (5,)
    torch.testing.assert_close(net.logits(x.repeat(1, 3, 1, 1)), net.logits(x))  # RGB -> channel mean
    assert net.logits(torch.zeros(2, 3, 32, 32)).shape == (2, 10)  # resized to 16x16
    with pytest.raises(ValueError):
        net.logits(torch.zeros(2, 2, 16, 16))


def test_augment_is_seeded_bounded_and_identity_when_off():
    x, _ = load_digits_tensor(16, "train")
    x = x[:8]
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.min() >= -1 and a.max() <= 1 and not torch.allclose(a, x)
    same = augment(x, torch.Generator().manual_seed(1), max_shift=0, max_rotate=0, max_scale=0, noise_std=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    net = tiny()
    save_classifier(net, tmp_path / "clf")
    back = load_classifier(tmp_path / "clf")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(back.logits(x), net.logits(x))
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(UsageError, match="not a digit classifier folder"):
        load_classifier(tmp_path)


def test_classifier_method_trains_and_exports(tmp_path):
    cfg = validate({"method": {"name": "classifier"}, "model": {"arch": {"channels": [4, 8], "hidden": 16}},
                    "data": {"name": "digits"},
                    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "log_with": "none"}})
    assert method_class("classifier").kind == "pretrain"
    Trainer(cfg, method_class("classifier"), tmp_path / "run", show_progress=False).fit()
    net = load_classifier(tmp_path / "run" / "export")
    assert net.config["hidden"] == 16
    with pytest.raises(UsageError, match="data.name=digits"):
        bad = validate({"method": {"name": "classifier"}, "model": {"arch": {}}, "data": {"name": "toy2d"}})
        Trainer(bad, method_class("classifier"), None, show_progress=False).fit()


def test_shipped_classifier_heldout_accuracy():
    net = load_classifier()
    x, y = load_digits_tensor(16, "heldout")
    assert accuracy(net, x, y) >= 0.97
    rgb = x.repeat(1, 3, 1, 1)  # as decoded by the digits-sd pipeline
    assert accuracy(net, rgb, y) >= 0.97
