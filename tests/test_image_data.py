"""Image-folder data (``data.name: images``): the three layouts, unreadable images skipped and counted, crops,
flips and caption dropout; the latent cache (reused, invalidated by the resolution, resumed shard by shard); DMD2's
GAN term and TSCD's data mode trained from a folder on the tiny SD1.5 pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.config import ImagesData, ModelConfig, load_config
from stepdistill.data import build_data
from stepdistill.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, seed: int, size=(32, 32)) -> None:
    """A random RGB image whose left half is dark and right half bright (so a mirror image is told apart)."""
    a = np.random.RandomState(seed).randint(0, 100, (size[1], size[0], 3))
    a[:, size[0] // 2:] += 155
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype("uint8")).save(path)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)


def imagefolder(root: Path, n: int = 8, column: str = "text") -> Path:
    """n images with metadata.jsonl captions (image 0 has two), plus one corrupt image."""
    folder = root / "imagefolder"
    rows = []
    for i in range(n):
        _png(folder / "train" / f"{i}.png", i)
        rows.append({"file_name": f"train/{i}.png", column: [f"photo {i}", f"picture {i}"] if i == 0 else f"photo {i}"})
    _corrupt(folder / "train" / "broken.png")
    rows.append({"file_name": "train/broken.png", column: "broken"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _cfg(folder: Path, **kw) -> ImagesData:
    return ImagesData(folder=str(folder), **kw)


# ---- layouts ----------------------------------------------------------------------------------------------
def test_imagefolder_with_metadata_skips_and_counts_the_corrupt_image(tmp_path, capsys):
    folder = imagefolder(tmp_path, column="caption")
    src = build_data(_cfg(folder, caption_column="caption", resolution=16))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stepdistill: skipped 1 unreadable images in {folder} (first: train/broken.png)"]
    assert len(src) == 8 and src.has_real
    s = src.sample(64, torch.Generator().manual_seed(0))
    assert s.x0.shape == (64, 3, 16, 16) and -1 <= s.x0.min() and s.x0.max() <= 1
    assert set(s.prompts) <= {f"photo {i}" for i in range(8)} | {"picture 0"} and "broken" not in s.prompts
    assert {"photo 0", "picture 0"} <= set(src.condition_set().prompts)
    again = src.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(again.x0, s.x0) and again.prompts == s.prompts  # all randomness from the generator


def test_caption_sidecars(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / f"{i}.jpg", i, size=(40, 32))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}\n")
    _png(tmp_path / "nocaption.png", 9)
    src = build_data(_cfg(tmp_path, resolution=16))
    assert "skipped 1 images without a caption" in capsys.readouterr().err
    assert sorted(src.condition_set().prompts) == ["caption 0", "caption 1", "caption 2"]
    assert src.conditions(5, torch.Generator().manual_seed(0)).x0 is None


def test_class_subfolders_give_sorted_class_ids(tmp_path):
    for name, seeds in {"zebra": (0, 1), "cat_face": (2,), "dog": (3, 4)}.items():
        for s in seeds:
            _png(tmp_path / name / f"{s}.png", s)
    src = build_data(_cfg(tmp_path, resolution=8))
    cs = src.condition_set()
    assert cs.labels.tolist() == [0, 1, 2] and cs.prompts == ["cat face", "dog", "zebra"]
    s = src.sample(32, torch.Generator().manual_seed(1))
    names = ["cat face", "dog", "zebra"]
    assert all(names[y] == p for y, p in zip(s.labels.tolist(), s.prompts))


def test_missing_or_empty_folder_is_one_line(tmp_path):
    for folder in (tmp_path / "nope", tmp_path):
        with pytest.raises(UsageError) as e:
            build_data(_cfg(folder, resolution=8))
        assert str(folder) in str(e.value) and "metadata.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_flip_crop_and_caption_dropout(tmp_path):
    _png(tmp_path / "a.png", 0, size=(48, 16))
    (tmp_path / "a.txt").write_text("wide")
    g = torch.Generator().manual_seed(0)
    plain = build_data(_cfg(tmp_path, resolution=16)).sample(1, g).x0[0]
    flipped = build_data(_cfg(tmp_path, resolution=16, hflip=1.0)).sample(1, g).x0[0]
    assert torch.equal(flipped, plain.flip(-1)) and plain[:, :, :8].mean() < plain[:, :, 8:].mean()
    crops = build_data(_cfg(tmp_path, resolution=16, crop="random")).sample(8, g).x0
    assert len({c.sum().item() for c in crops}) > 1  # the 48-wide image is cropped at different offsets
    src = build_data(_cfg(tmp_path, resolution=16, empty_prompt_prob=1.0))
    assert src.sample(4, g).prompts == [""] * 4 and src.conditions(4, g).prompts == ["wide"] * 4


# ---- the latent cache ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from stepdistill.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def encodes(monkeypatch):
    """Images encoded by any AutoencoderKL (a counter around ``encode``)."""
    from diffusers import AutoencoderKL

    count, encode = [0], AutoencoderKL.encode

    def counted(self, x, *a, **kw):
        count[0] += x.shape[0]
        return encode(self, x, *a, **kw)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    return count


def test_latent_cache_reuse_resolution_and_resume(tmp_path, tiny_sd, encodes, monkeypatch):
    from stepdistill.data import latent_cache
    from stepdistill.data.digits import encode_posterior
    from stepdistill.data.images import load_image
    from stepdistill.models import load_bundle

    bundle = load_bundle(ModelConfig(pretrained=str(tiny_sd)))
    folder, cache = imagefolder(tmp_path), tmp_path / "cache"
    src = build_data(_cfg(folder, cache_dir=str(cache), hflip=0.5), bundle)
    assert src.resolution == 16 and encodes[0] == 16  # 8 readable images + their mirror images
    x0 = src.sample(4, torch.Generator().manual_seed(0)).x0
    assert x0.shape == (4, *bundle.sample_shape)
    build_data(_cfg(folder, cache_dir=str(cache), hflip=0.5), bundle)
    assert encodes[0] == 16  # a second source encodes nothing
    mean, std = src.cache.read([0, 0], [False, True])  # float16 on disk
    image = load_image(folder / "train/0.png", 16)[None]
    ref_mean, ref_std = encode_posterior(bundle.vae, torch.cat([image, image.flip(-1)]), bundle.vae_scaling)
    assert torch.allclose(mean, ref_mean, atol=2e-3) and torch.allclose(std, ref_std, rtol=2e-3)
    encodes[0] -= 2
    build_data(_cfg(folder, cache_dir=str(cache), hflip=0.5, resolution=32), bundle)
    assert encodes[0] == 32 and len(list(cache.iterdir())) == 2  # another resolution: another key

    monkeypatch.setattr(latent_cache, "SHARD_SIZE", 3)  # shards of files 0-2, 3-5, 6-8 (8: the broken one)
    again = build_data(_cfg(folder, cache_dir=str(tmp_path / "sharded")), bundle)
    shards = sorted(again.cache.folder.glob("shard-*.safetensors"))
    assert len(shards) == 3 and encodes[0] == 40
    shards[1].unlink()  # a build stopped before its second shard
    shards[2].write_bytes(shards[2].read_bytes()[:50])  # a torn file (not written by the cache, but on disk)
    again = build_data(_cfg(folder, cache_dir=str(tmp_path / "sharded")), bundle)
    assert encodes[0] == 40 + 3 + 2 and len(again) == 8


# ---- training from an image folder -------------------------------------------------------------------------
def test_dmd2_gan_and_tscd_data_mode_train_from_a_folder(tmp_path, tiny_sd, encodes):
    """DMD2 with its GAN term (the shipped image-folder recipe), then TSCD with x0 from data (its SD1.5 recipe with
    the data section replaced), 2 steps each on the tiny SD1.5 pipeline; the second run reuses the latents the
    first one cached."""
    from stepdistill.trainers import Trainer, method_class

    folder, cache = imagefolder(tmp_path), tmp_path / "cache"
    common = [f"model.pretrained={tiny_sd}", "train.steps=2", "train.batch_size=2", "train.log_every=1",
              "train.log_with=none", "method.student.lora.rank=4"]
    data = [f"data.folder={folder}", f"data.cache_dir={cache}"]
    cfg = load_config(ROOT / "configs/sd15/dmd2_gan_images_lora.yaml", common + data + [
        "method.fake_score.lora.rank=4", "method.student_every=2", "method.gan.hidden=16"])
    assert cfg.train.gradient_checkpointing  # the generator term's frozen fake score is recomputed frozen
    Trainer(cfg, method_class("dmd"), tmp_path / "dmd", show_progress=False).fit()
    rows = [json.loads(x) for x in (tmp_path / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert any("fake_score/gan_d" in r for r in rows) and any("student/gan_g" in r for r in rows)
    assert all(np.isfinite(v) for r in rows for k, v in r.items() if "/" in k)
    assert encodes[0] == 16

    image_data = f"data={{name: images, folder: '{folder}', cache_dir: '{cache}', hflip: 0.5}}"
    cfg = load_config(ROOT / "configs/sd15/tscd_lora.yaml", common + [
        image_data, "method.x0_source=data", "method.stages=[{segments: 2, steps: 1}, {segments: 1, steps: 1}]"])
    Trainer(cfg, method_class("tscd"), tmp_path / "tscd", show_progress=False).fit()
    rows = [json.loads(x) for x in (tmp_path / "tscd" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["student/tscd"]) for r in rows)
    assert encodes[0] == 16  # the cache of the DMD2 run: nothing encoded again
