"""`stepdistill eval` judges every row against the right data and times rows fairly: a toy2d run is scored
against the mixture it was trained on (not the default ring), mismatched mixtures are refused, and speed is the
median of interleaved timing rounds, which a slow batch does not move."""

import time

import torch
import yaml

from conftest import run_cli
from stepdistill.cli import main
from stepdistill.eval.report import load_report

SQUARE = {"name": "toy2d", "means": [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], "std": 0.05}


def mixture_run(root, name: str, data: dict):
    """A hand-made toy2d run trained on ``data``: its config and a 1-step LCM student (a random MLP)."""
    from stepdistill.denoisers import MLP
    from stepdistill.models import save_mlp
    from stepdistill.pipelines.plan import SamplingRecipe

    run = root / name
    run.mkdir()
    cfg = {"method": {"name": "dmd"}, "model": {"pretrained": "toy2d", "init": None}, "data": data,
           "train": {"steps": 10}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    save_mlp(MLP(dim=2, hidden=16, depth=1), run / "student", "epsilon")
    SamplingRecipe(scheduler="LCMScheduler", timesteps=[999], num_inference_steps=None).save(
        run / "student" / "sampling.json")
    return run


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_toy2d_run_is_judged_against_its_own_mixture(tmp_path):
    run = mixture_run(tmp_path, "square", SQUARE)
    assert main(["eval", "--run", str(run), "--model", "toy2d", "--steps", "50", "--num-samples", "400",
                 "--batch-size", "200", "--out", str(tmp_path / "rep"), "--quiet", "--speed-repeats", "1"]) == 0
    teacher, student = load_report(tmp_path / "rep" / "report.json").rows
    # the exact teacher of the square: 4 modes, all covered, nearly every sample within 3 std of one
    assert teacher.num_modes == 4 and teacher.modes_covered == 4 and teacher.on_mode > 0.9
    assert teacher.sw2 < 0.5 and student.num_modes == 4  # the teacher row on the square itself


def test_data_flag_sets_the_teacher_mixture(tmp_path):
    assert main(["eval", "--model", "toy2d", "--data", "num_modes=3", "radius=1.0", "std=0.05", "--steps", "50",
                 "--num-samples", "300", "--batch-size", "300", "--out", str(tmp_path / "rep"), "--quiet",
                 "--no-speed"]) == 0
    (teacher,) = load_report(tmp_path / "rep" / "report.json").rows
    assert teacher.num_modes == 3 and teacher.modes_covered == 3 and teacher.on_mode > 0.9


def test_mismatched_mixtures_are_refused(tmp_path):
    a = mixture_run(tmp_path, "square", SQUARE)
    b = mixture_run(tmp_path, "ring", {"name": "toy2d"})
    line = one_line_error(run_cli("eval", "--model", "toy2d", "--run", a, "--data", "num_modes=4", "--steps", "1",
                                  "--out", tmp_path / "r1"))
    assert "another toy2d mixture than --data" in line
    line = one_line_error(run_cli("eval", "--model", "toy2d", "--run", a, b, "--steps", "1", "--out", tmp_path / "r2"))
    assert "different toy2d mixtures" in line
    line = one_line_error(run_cli("eval", "--model", "digits", "--data", "num_modes=4", "--out", tmp_path / "r3"))
    assert "--data" in line
    line = one_line_error(run_cli("eval", "--model", "toy2d", "--data", "num_mode=4", "--out", tmp_path / "r4"))
    assert "num_modes" in line  # the closest key is named


# ---- speed ---------------------------------------------------------------------------------------------
def test_speed_median_ignores_a_slow_batch():
    from stepdistill.eval.speed import SpeedMeter

    with SpeedMeter("cpu", batch_size=10) as m:
        for delay in (0.3, 0.02, 0.02, 0.25, 0.02, 0.02):  # warm-up, then one batch hit by a 0.25 s stall
            m.time(lambda: time.sleep(delay), 10)
    sp = m.result()
    assert sp.batches == 5 and 1.9 < sp.ms_per_image < 4.0  # 2 ms per image, not the mean's 6.6
    assert sp.ms_spread > 20 and abs(sp.images_per_s - 1000 / sp.ms_per_image) < 1e-9


def test_timing_rounds_interleave_rows_and_take_medians():
    from stepdistill.eval.benchmark import Benchmark
    from stepdistill.eval.evaluate import Entry, interleaved_speed
    from stepdistill.pipelines.plan import SamplingRecipe

    calls = []

    class Fake:
        def __init__(self, name, delay):
            self.name, self.delay, self.n = name, delay, 0

        def __call__(self, spec, conds, seeds):
            calls.append(self.name)
            self.n += 1
            time.sleep(0.5 if self.name == "student" and self.n == 3 else self.delay)  # one stalled round

    spec = SamplingRecipe(scheduler="DDIMScheduler", num_inference_steps=1)
    entries = [Entry("teacher", "teacher", Fake("teacher", 0.1), spec, "t"),
               Entry("student", "dmd", Fake("student", 0.01), spec, "s")]
    teacher, student = interleaved_speed(Benchmark("toy2d"), entries, batch_size=5, repeats=5, progress=False)
    assert calls == ["teacher", "student"] * 6  # a warm-up round, then 5 rounds, one batch per row in turn
    assert teacher["speed_batches"] == student["speed_batches"] == 5
    # 20 vs 2 ms per image (sleep overshoots on a busy machine); the stalled round (100 ms per image) is dropped
    assert student["ms_per_image"] < 10 and 4 < teacher["ms_per_image"] / student["ms_per_image"] < 12
    assert student["ms_spread"] > 80
