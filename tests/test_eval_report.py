"""`stepdistill eval`: report files and schema, digits-style runs on stand-in assets, one-line errors (exit 2)."""

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli
from stepdistill.cli import main
from stepdistill.eval.report import Report, ReportRow, load_report, write_report

TINY_CLIP = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1,
                                            "head_width": 8, "mlp_ratio": 1.0},
             "text_cfg": {"context_length": 16, "width": 8, "heads": 1, "layers": 1}}


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """A random digit classifier, a 2-step digits-clip (the real trainer, tiny arch) and a tiny
    class-conditional UNet2DModel teacher folder."""
    from stepdistill.classifier import DigitClassifier, save_classifier
    from test_eval_samplers import _tiny_unet2d

    root = tmp_path_factory.mktemp("standins")
    torch.manual_seed(0)
    save_classifier(DigitClassifier(channels=(4, 8), hidden=16), root / "classifier")
    cfg = {"method": {"name": "open_clip", "num_merges": 64},
           "model": {"arch": TINY_CLIP},
           "data": {"name": "digits_sd", "empty_prompt_prob": 0.0},
           "train": {"steps": 2, "batch_size": 16, "log_with": "none", "checkpoint_every": 2}}
    (root / "clip.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", str(root / "clip.yaml"), "--out", str(root / "clip-run"), "--quiet"]) == 0
    _tiny_unet2d(root / "teacher")
    return root


def _rows():
    base = {k: None for k in ReportRow.model_fields}
    return [{**base, "name": "teacher DDIM-4", "method": "teacher", "steps": 4, "nfe": 4.0, "fid": 3.2,
             "precision": 0.8, "recall": 0.7, "ms_per_image": 2.0},
            {**base, "name": "teacher DDIM-50", "method": "teacher", "steps": 50, "nfe": 50.0, "fid": 1.1,
             "ms_per_image": 20.0}]


def test_report_files_and_schema(tmp_path):
    write_report(_rows(), tmp_path, {"benchmark": "digits"})
    for f in ("report.json", "report.md", "report.html", "report.schema.json", "fid_vs_nfe.png", "quality_vs_ms.png"):
        assert (tmp_path / f).exists(), f
    rep = load_report(tmp_path / "report.json")
    assert [r.name for r in rep.rows] == ["teacher DDIM-4", "teacher DDIM-50"]
    schema = json.loads((tmp_path / "report.schema.json").read_text())
    assert schema == Report.model_json_schema()
    required = {"name", "method", "steps", "nfe", "fid", "precision", "recall", "clip_score", "condition_accuracy",
                "diversity", "ms_per_image", "sw2", "modes_covered", "on_mode"}
    assert required <= set(json.loads((tmp_path / "report.json").read_text())["rows"][0])
    assert "| teacher DDIM-4 | teacher | 4 | 4 | 3.2 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 2
    with pytest.raises(Exception):
        Report.model_validate({**json.loads((tmp_path / "report.json").read_text()), "rows": [{"name": "x"}]})


def test_toy2d_eval_end_to_end(tmp_path):
    r = run_cli("eval", "--model", "toy2d", "--steps", "1,8", "--num-samples", "200", "--batch-size", "100",
                "--out", tmp_path / "rep", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = load_report(tmp_path / "rep" / "report.json")
    one, eight = rep.rows
    assert (one.steps, one.nfe, eight.nfe) == (1, 1.0, 8.0)
    assert eight.modes_covered == 8 and eight.sw2 < one.sw2 and eight.fid is None
    assert eight.ms_per_image > 0 and eight.peak_mem_mb > 0 and eight.batch_size == 100
    assert (tmp_path / "rep" / eight.grid).exists()


def test_digits_eval_on_standins(standins, tmp_path):
    """--model FOLDER --benchmark digits with a stand-in classifier and CLIP: every digits metric is filled."""
    out = tmp_path / "rep"
    argv = ["eval", "--model", str(standins / "teacher"), "--benchmark", "digits", "--steps", "1,2",
            "--num-samples", "20", "--batch-size", "10", "--out", str(out), "--classifier",
            str(standins / "classifier"), "--clip-model", "digits-clip", "--clip-pretrained",
            str(standins / "clip-run" / "export"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    rep = load_report(out / "report.json")
    assert rep.settings["benchmark"] == "digits" and rep.settings["reference"].startswith("digits-train")
    for row in rep.rows:
        for k in ("fid", "precision", "recall", "clip_score", "condition_accuracy", "diversity", "ms_per_image"):
            assert getattr(row, k) is not None, k
        assert row.sw2 is None and 0 <= row.condition_accuracy <= 1 and 0 <= row.clip_score <= 100
    assert len(list((tmp_path / "cache").glob("digits-train__digits-classifier-*.npz"))) == 1
    # the same seed gives the same numbers whatever the batch size
    argv2 = [a if a != "10" else "20" for a in argv]
    argv2[argv2.index("--out") + 1] = str(tmp_path / "rep2")
    assert main(argv2) == 0
    rep2 = load_report(tmp_path / "rep2" / "report.json")
    for a, b in zip(rep.rows, rep2.rows):
        assert a.fid == pytest.approx(b.fid, rel=1e-4) and a.condition_accuracy == b.condition_accuracy


def test_images_folder_with_class_subfolders(standins, tmp_path):
    from PIL import Image

    from stepdistill.data.digits import load_digits_tensor

    x, y = load_digits_tensor(16, "heldout")
    for i in range(30):
        d = tmp_path / "imgs" / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((x[i, 0] / 2 + 0.5) * 255).round().byte().numpy()).save(d / f"{i}.png")
    out = tmp_path / "rep"
    assert main(["eval", "--images", str(tmp_path / "imgs"), "--out", str(out), "--classifier",
                 str(standins / "classifier"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    row = load_report(out / "report.json").rows[0]
    assert row.method == "images" and row.num_samples == 30 and row.fid is not None
    assert row.condition_accuracy is not None and row.nfe is None and row.ms_per_image is None


@pytest.mark.parametrize("case", ["empty", "mixed", "corrupt", "no_student", "bad_steps", "nothing"])
def test_bad_input_is_one_line_exit_2(case, tmp_path):
    from PIL import Image

    from test_eval_samplers import toy_run

    folder = tmp_path / "imgs"
    folder.mkdir()
    args = ["eval", "--images", folder, "--out", tmp_path / "rep"]
    if case == "mixed":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "b.png")
    elif case == "corrupt":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
        (folder / "b.png").write_bytes(b"\x89PNG not really")
    elif case == "no_student":
        args = ["eval", "--run", toy_run(tmp_path, student=False), "--out", tmp_path / "rep"]
    elif case == "bad_steps":
        args = ["eval", "--model", "toy2d", "--steps", "4,x", "--out", tmp_path / "rep"]
    elif case == "nothing":
        args = ["eval", "--out", tmp_path / "rep"]
    line = one_line_error(run_cli(*args))
    expect = {"empty": "no images", "mixed": "mixed image sizes", "corrupt": "corrupt", "no_student": "no student",
              "bad_steps": "--steps", "nothing": "say what to evaluate"}[case]
    assert expect in line and not (tmp_path / "rep" / "report.json").exists()


def test_student_run_eval(tmp_path):
    from test_eval_samplers import toy_run

    run = toy_run(tmp_path)
    assert main(["eval", "--run", str(run), "--model", "toy2d", "--steps", "2", "--num-samples", "50",
                 "--batch-size", "25", "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    teacher, student = load_report(tmp_path / "rep" / "report.json").rows
    assert teacher.method == "teacher" and student.method == "dmd"
    assert student.name == "toy-run LCM-2" and student.nfe == 2 and student.scheduler == "LCMScheduler"


def test_open_clip_export_loads_the_open_clip_ways(standins):
    """The exported folder opens by registered name + weights file and through open_clip's ``local-dir:``."""
    import open_clip

    from stepdistill.eval.clip_score import CLIPScorer

    folder = standins / "clip-run" / "export"
    scorer = CLIPScorer("digits-clip", str(folder))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    ids = tok(["a handwritten digit seven"])
    assert torch.equal(ids, scorer.tokenizer(["a handwritten digit seven"]))
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
    assert torch.allclose(a, scorer.text_embeddings(["a handwritten digit seven"]), atol=1e-5)


def test_shipped_digits_clip_prefers_the_right_digit():
    from stepdistill.data.digits import load_digits_tensor
    from stepdistill.data.prompts import digit_prompt
    from stepdistill.eval.clip_score import CLIPScorer

    x, y = load_digits_tensor(16, "heldout")
    scorer = CLIPScorer()  # the digits-clip asset
    right = scorer.score(x[:40] / 2 + 0.5, [digit_prompt(int(d)) for d in y[:40]])
    wrong = scorer.score(x[:40] / 2 + 0.5, [digit_prompt(int(d + 1) % 10) for d in y[:40]])
    assert right.mean() > 50 > 20 > wrong.mean()


def test_text_to_image_eval_through_the_stock_pipeline(standins, tmp_path):
    """A Stable Diffusion folder on the digits-sd benchmark: prompts from the templates, CFG counted twice."""
    from stepdistill.testing import tiny_sd_pipeline

    sd = tiny_sd_pipeline(tmp_path / "sd")
    out = tmp_path / "rep"
    assert main(["eval", "--model", str(sd), "--benchmark", "digits-sd", "--steps", "2", "--guidance", "2",
                 "--num-samples", "12", "--batch-size", "6", "--out", str(out), "--classifier",
                 str(standins / "classifier"), "--clip-model", "digits-clip", "--clip-pretrained",
                 str(standins / "clip-run" / "export"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    row = load_report(out / "report.json").rows[0]
    assert row.name == "teacher DDIM-2 w=2" and row.nfe == 4 and row.guidance_scale == 2
    assert None not in (row.fid, row.clip_score, row.condition_accuracy, row.ms_per_image)
    assert row.diversity is None  # 12 samples over 10 digits x 6 templates: no prompt drawn twice, no pair
