"""`stepdistill eval` offline: Inception weights from a file, open_clip weights from a Hub-layout folder, the
metrics a report could not compute (why, and the flag), --threads, and the evaluated teacher's guidance."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from stepdistill.cli import main
from stepdistill.errors import UsageError
from stepdistill.eval.features import INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL
from stepdistill.eval.report import load_report
from test_eval_report import TINY_CLIP


# ---- Inception ----------------------------------------------------------------------------------------
class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.proj = torch.nn.Linear(48, 2048)

    def forward(self, x):  # (B, 3, 299, 299) in [-1, 1] -> (B, 2048)
        return self.proj(self.pool(x).flatten(1))


class _StandInInception(torch.nn.Module):
    """clean-fid's TorchScript Inception interface: ``layers`` maps scaled 299x299 images to pool3 features."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers((x - 128) / 128)


def _inception(path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    return path


def _folder(path, n, seed):
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_inception_file_gives_fid_of_an_image_folder(tmp_path, monkeypatch, capsys):
    weights = _inception(tmp_path / "standin.pt")
    a, b = _folder(tmp_path / "a", 8, 0), _folder(tmp_path / "b", 8, 1)
    argv = ["eval", "--images", str(a), "--ref", str(b), "--out", str(tmp_path / "rep"), "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    assert main([*argv, "--inception", str(weights)]) == 0
    rep = load_report(tmp_path / "rep" / "report.json")
    row = rep.rows[0]
    assert math.isfinite(row.fid) and row.precision is not None and row.diversity is not None
    assert rep.settings["feature_extractor"].startswith("inception-v3-clean-")
    assert rep.settings["inception_weights"] == str(weights)
    # the environment variable does the same; the cached reference statistics are reused
    monkeypatch.setenv(INCEPTION_ENV, str(weights))
    argv[argv.index("--out") + 1] = str(tmp_path / "rep2")
    assert main(argv) == 0
    assert load_report(tmp_path / "rep2" / "report.json").rows[0].fid == pytest.approx(row.fid)
    assert len(list((tmp_path / "cache").glob("folder-b-*__inception-v3-clean-*.npz"))) == 1


@pytest.mark.parametrize("case", ["missing", "not_torchscript", "env_missing"])
def test_missing_inception_says_what_and_where_from(case, tmp_path, monkeypatch, capsys):
    a = _folder(tmp_path / "a", 4, 0)
    argv = ["eval", "--images", str(a), "--ref", str(a), "--out", str(tmp_path / "rep"), "--quiet"]
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    if case == "missing":
        argv += ["--inception", str(tmp_path / "nowhere.pt")]
    elif case == "not_torchscript":
        (tmp_path / INCEPTION_FILE).write_bytes(b"not a TorchScript file")
        argv += ["--inception", str(tmp_path)]  # a folder stands for FOLDER/inception-2015-12-05.pt
    else:
        monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    for part in (INCEPTION_FILE, INCEPTION_URL, "--inception FILE", f"{INCEPTION_ENV}=FILE"):
        assert part in err[0], (part, err[0])
    assert not (tmp_path / "rep" / "report.json").exists()


# ---- open_clip weights in Hub layout ---------------------------------------------------------------------
def _hub_clip(folder, weights="open_clip_model.safetensors"):
    """A tiny open_clip CLIP saved as the Hugging Face Hub lays open_clip models out."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, folder / weights)
    else:
        torch.save(state, folder / weights)
    return model.eval()


def test_open_clip_hub_folder_and_weights_file(tmp_path):
    from stepdistill.eval.clip_score import CLIPScorer

    model = _hub_clip(tmp_path / "hub")
    _hub_clip(tmp_path / "hub-bin", "open_clip_pytorch_model.bin")
    images = torch.rand(3, 3, 16, 16)
    prompts = ["a cat", "a dog", "a digit seven"]
    scorers = [CLIPScorer(None, str(tmp_path / "hub")), CLIPScorer("ViT-B-32", str(tmp_path / "hub")),
               CLIPScorer(None, str(tmp_path / "hub-bin")),
               CLIPScorer("tiny-hub-clip", str(tmp_path / "hub" / "open_clip_model.safetensors"))]
    assert scorers[0].mean.flatten().tolist() == [0.5] * 3  # the folder's preprocessing
    with torch.no_grad():
        expect = torch.nn.functional.normalize(model.encode_text(scorers[0].tokenizer(prompts)), dim=-1)
    for s in scorers:
        assert torch.allclose(s.text_embeddings(prompts), expect, atol=1e-5)
        assert torch.allclose(s.score(images, prompts), scorers[0].score(images, prompts), atol=1e-4)


@pytest.mark.parametrize("case", ["empty", "no_weights"])
def test_bad_open_clip_folder_names_the_layout(case, tmp_path):
    from stepdistill.eval.clip_score import CLIPScorer

    folder = tmp_path / "clip"
    folder.mkdir()
    if case == "no_weights":
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(UsageError) as e:
        CLIPScorer("ViT-B-32", str(folder))
    assert "open_clip_model.safetensors or open_clip_pytorch_model.bin" in str(e.value)
    assert "assets build" not in str(e.value)


def test_text_to_image_eval_with_a_hub_clip_lists_what_it_could_not_compute(tmp_path, capsys):
    from stepdistill.testing import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path / "sd")
    _hub_clip(tmp_path / "hub")
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    out = tmp_path / "rep"
    assert main(["eval", "--model", str(sd), "--steps", "1", "--num-samples", "4", "--batch-size", "4",
                 "--no-speed", "--prompts", str(tmp_path / "prompts.txt"), "--clip-pretrained",
                 str(tmp_path / "hub"), "--out", str(out), "--quiet"]) == 0
    rep = load_report(out / "report.json")
    assert rep.rows[0].clip_score is not None and rep.rows[0].fid is None
    assert rep.settings["clip_model"] == "open_clip:hub"
    assert set(rep.settings["missing_metrics"]) == {"fid", "precision", "recall", "diversity", "condition_accuracy"}
    printed = capsys.readouterr().out
    assert "stepdistill: fid: no reference images; pass --ref FOLDER" in printed
    assert "clip_score:" not in printed


# ---- metrics that were not computed ----------------------------------------------------------------------
def test_diffusers_folder_without_ref_lists_missing_metrics_and_flags(tmp_path, capsys):
    from test_eval_samplers import _tiny_unet2d

    out = tmp_path / "rep"
    assert main(["eval", "--model", str(_tiny_unet2d(tmp_path / "unet")), "--steps", "1", "--num-samples", "4",
                 "--batch-size", "4", "--no-speed", "--out", str(out), "--quiet"]) == 0
    missing = load_report(out / "report.json").settings["missing_metrics"]
    assert missing["fid"] == "no reference images; pass --ref FOLDER"
    assert set(missing) == {"fid", "precision", "recall", "diversity", "clip_score", "condition_accuracy"}
    assert "--prompts FILE" in missing["clip_score"] and "--benchmark digits" in missing["condition_accuracy"]
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("stepdistill: ") and "wrote" not in line]
    assert len(lines) == len(missing)
    assert "stepdistill: fid: no reference images; pass --ref FOLDER" in lines
    md = (out / "report.md").read_text()
    assert "- missing_metrics:" in md and "  - clip_score: no prompts; pass --prompts FILE" in md
    assert "no reference images; pass --ref FOLDER" in (out / "report.html").read_text()


def test_unlabelled_image_folder_lists_missing_metrics(tmp_path, capsys):
    a = _folder(tmp_path / "imgs", 6, 0)
    assert main(["eval", "--images", str(a), "--out", str(tmp_path / "rep"), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0  # the digits benchmark: FID against the digits
    missing = load_report(tmp_path / "rep" / "report.json").settings["missing_metrics"]
    assert set(missing) == {"clip_score", "condition_accuracy"}
    assert "subfolders 0..9" in missing["condition_accuracy"]
    assert "stepdistill: clip_score: an image folder has no prompts" in capsys.readouterr().out


# ---- threads --------------------------------------------------------------------------------------------
def test_threads_flag(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["eval", "--model", "toy2d", "--steps", "1", "--num-samples", "20", "--batch-size", "20",
                     "--no-speed", "--threads", "2", "--out", str(tmp_path / "rep"), "--quiet"]) == 0
        assert load_report(tmp_path / "rep" / "report.json").settings["torch_threads"] == 2
        assert main(["sample", "--model", "toy2d", "--steps", "1", "--num", "1", "--threads", "1", "--out",
                     str(tmp_path / "s")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["eval", "--model", "toy2d", "--threads", "0", "--out", str(tmp_path / "r")]) == 2
    assert main(["sample", "--model", "toy2d", "--threads", "0", "--out", str(tmp_path / "s2")]) == 2
    assert "--threads 0" in capsys.readouterr().err


# ---- the evaluated teacher's guidance --------------------------------------------------------------------
def _guided_run(tmp_path, real_guidance):
    """toy_run (a hand-made toy2d DMD run) whose config records the real-score guidance it was distilled with."""
    from test_eval_samplers import toy_run

    run = toy_run(tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["method"]["real_guidance"] = real_guidance
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_teacher_rows_default_to_the_runs_real_score_guidance(tmp_path):
    run = _guided_run(tmp_path, 1.75)
    base = ["eval", "--model", "toy2d", "--run", str(run), "--steps", "2", "--num-samples", "20",
            "--batch-size", "20", "--no-speed", "--quiet", "--out"]
    assert main([*base, str(tmp_path / "rep")]) == 0
    rep = load_report(tmp_path / "rep" / "report.json")
    teacher = rep.rows[0]
    assert teacher.method == "teacher" and teacher.guidance_scale == 1.75 and teacher.name == "teacher DDIM-2 w=1.75"
    assert rep.settings["teacher_guidance"] == "1.75 (the run's real-score guidance)"
    assert main([*base, str(tmp_path / "rep2"), "--guidance", "3"]) == 0  # an explicit --guidance wins
    rep = load_report(tmp_path / "rep2" / "report.json")
    assert rep.rows[0].guidance_scale == 3 and rep.settings["teacher_guidance"] == "3 (--guidance)"


def test_teacher_guidance_sources():
    from stepdistill.eval.cli import _teacher_guidance

    asset = SimpleNamespace(info={"metrics": {"guidance_scale": 3.0}})  # as digits-sd's asset.json records it
    bare = SimpleNamespace(info={})

    def run(src, g):
        return SimpleNamespace(source=src, info={"method": {"name": "dmd", "real_guidance": g}})

    args = SimpleNamespace(guidance=None)
    assert _teacher_guidance(args, asset, []) == (3.0, "the model's recommended value")
    assert _teacher_guidance(args, bare, []) == (None, "the model records no recommended value")
    assert _teacher_guidance(args, asset, [run("runs/a", 1.75)]) == (1.75, "the run's real-score guidance")
    assert _teacher_guidance(args, asset, [run("runs/a", 2), run("runs/b", 2)])[0] == 2
    g, why = _teacher_guidance(args, asset, [run("runs/a", 1.75), run("runs/b", 2.5)])
    assert g == 3.0 and "differs (a: 1.75, b: 2.5)" in why
    no_key = SimpleNamespace(source="runs/c", info={"method": {"name": "tscd"}})
    assert _teacher_guidance(args, asset, [no_key])[0] == 3.0
    assert _teacher_guidance(SimpleNamespace(guidance=1.5), asset, [run("runs/a", 1.75)]) == (1.5, "--guidance")
