"""Metrics of stepdistill.eval against the field's tools and constructed cases with known answers."""

import math

import numpy as np
import pytest
import torch

from stepdistill.eval import FIDStats, clip_score_from_embeddings, diversity, fid_from_features, fid_metric
from stepdistill.eval.features import PassThrough, Recorder
from stepdistill.eval.precision_recall import knn_radii, precision_recall


def _sets(n=400, d=8, seed=0):
    rng = np.random.RandomState(seed)
    a = rng.randn(n, d)
    mix = rng.randn(d, d) * 0.3 + np.eye(d)
    b = rng.randn(n, d) @ mix + 0.5
    return a, b


def test_fid_of_a_set_against_itself_is_zero():
    a, _ = _sets()
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(torch.tensor(a), torch.tensor(a)) == pytest.approx(0.0, abs=1e-6)


def test_fid_agrees_with_clean_fid_and_torchmetrics():
    from cleanfid.fid import frechet_distance
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _sets()
    ours = fid_from_features(a, b)
    clean = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    tm = FrechetInceptionDistance(feature=PassThrough(8), normalize=True)
    tm.update(torch.tensor(a), real=True)
    tm.update(torch.tensor(b), real=False)
    assert ours > 1.0
    assert abs(ours - clean) / clean <= 1e-4
    assert abs(ours - float(tm.compute())) / ours <= 1e-4
    # the cached-reference path: real statistics loaded into torchmetrics' running sums
    m = fid_metric(PassThrough(8), real=FIDStats.from_features(a))
    m.update(torch.tensor(b), real=False)
    assert abs(ours - float(m.compute())) / ours <= 1e-4


def test_fid_closed_form_for_shifted_gaussians():
    """Equal covariances: FID = ||mu1 - mu2||^2 exactly (with sample statistics)."""
    a, _ = _sets(d=4)
    b = a + np.array([1.0, 2.0, 0.0, 0.0])
    assert fid_from_features(a, b) == pytest.approx(5.0, rel=1e-6)


def test_clean_fid_folder_path_matches_features(tmp_path):
    from PIL import Image

    from stepdistill.eval import folder_fid

    class MeanStd(torch.nn.Module):  # a 6-d feature: channel means and stds
        num_features, name = 6, "meanstd"

        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    rng = np.random.RandomState(0)
    for name, hi in (("a", 255), ("b", 160)):
        (tmp_path / name).mkdir()
        for i in range(24):
            Image.fromarray(rng.randint(0, hi, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    from stepdistill.eval.images import folder_features, list_images

    fa = folder_features(list_images(tmp_path / "a"), MeanStd(), progress=False)
    fb = folder_features(list_images(tmp_path / "b"), MeanStd(), progress=False)
    expected = fid_from_features(fa, fb)
    assert folder_fid(tmp_path / "a", tmp_path / "b", MeanStd()) == pytest.approx(expected, rel=1e-4)


def test_recorder_feeds_torchmetrics_and_keeps_features():
    a, b = _sets(n=50)
    rec = Recorder(PassThrough(8))
    m = fid_metric(rec, FIDStats.from_features(a))
    for chunk in torch.tensor(b).split(20):
        m.update(chunk, real=False)
    assert torch.allclose(rec.features().double(), torch.tensor(b).float().double())


# ---- precision / recall (Kynkäänniemi et al. 2019) ---------------------------------------------------
def test_knn_radius_on_a_line():
    pts = torch.arange(10.0)[:, None]
    r = knn_radii(pts, k=3)
    assert r[0] == 3 and r[9] == 3 and torch.all(r[2:8] == 2)


def test_precision_recall_known_cases():
    line = torch.arange(10.0)[:, None]
    assert precision_recall(line, line) == (1.0, 1.0)
    # 4.5 lies inside the real manifold (radius 2 around 3..6), 20 is 11 away from 9 (radius 3)
    fake = torch.tensor([[4.5], [20.0], [4.0], [21.0], [22.0]])
    p, _ = precision_recall(line, fake)
    assert p == pytest.approx(2 / 5)
    # fake = one of two far-apart clusters: all fake samples are real-looking, half the real data is missed
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(60, 2, generator=rng)
    real = torch.cat([a, a[:40] + 100.0])
    p, r = precision_recall(real, a)
    assert p == 1.0 and r == pytest.approx(60 / 100)
    p, r = precision_recall(real, a + 1000.0)
    assert (p, r) == (0.0, 0.0)


# ---- CLIP score and diversity -------------------------------------------------------------------------
def test_clip_score_on_known_cosines():
    angles = torch.tensor([0.0, math.pi / 3, math.pi / 2, 2 * math.pi / 3])
    img = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    txt = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    s = clip_score_from_embeddings(img, txt)
    assert torch.allclose(s, torch.tensor([100.0, 50.0, 0.0, 0.0], dtype=torch.float64), atol=1e-9)


def test_diversity_per_condition():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    # group 0: orthogonal pair -> cosine distance 1; group 1: identical -> 0; group 2 has one sample
    assert diversity(f, [0, 0, 1, 1, 2]) == pytest.approx(0.5)
    assert diversity(f[:2], None, metric="l2") == pytest.approx(math.sqrt(2))
    assert diversity(f[:1], None) is None
