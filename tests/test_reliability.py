"""Faults a run must survive and bad inputs that must be one line: checkpoints that are never non-finite and are
verified on resume (falling back past torn or altered ones), a run-directory lock, SIGTERM / SIGINT that
checkpoint and exit 143 / 130, full disks, metrics without duplicates, and a table of bad inputs across the
subcommands (exit code 2, one stderr line, no traceback)."""

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT
from stepdistill import signals
from stepdistill.cli import main
from stepdistill.config import validate
from stepdistill.errors import TrainingFault, UsageError
from stepdistill.trainers import Trainer, method_class
from stepdistill.trainers.denoising import DenoisingMethod
from stepdistill.training import latest_checkpoint
from stepdistill.training.checkpoint import CorruptCheckpoint, verify
from stepdistill.training.runlock import LOCK_FILE, RunLock

TOY = {
    "method": {"name": "denoising", "cond_dropout": 0.0},
    "model": {"arch": {"dim": 2, "hidden": 16, "depth": 1}, "kind": "mlp", "prediction_type": "epsilon"},
    "data": {"name": "toy2d"},
    "train": {"steps": 8, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 2,
              "log_with": "none", "num_threads": 1, "optim": {"lr": 1e-2}, "ema": {"decay": 0.9}},
}
SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
DMD = {  # a one-step DMD student as a LoRA on a tiny MLP (the exact toy2d mixture is the teacher)
    "method": {"name": "dmd", "timesteps": [999], "student_every": 1, "student": {"lora": {"rank": 2}},
               "fake_score": {"lora": {"rank": 2}}},
    "model": {"pretrained": "toy2d", "arch": {"hidden": 16, "depth": 1}, "prediction_type": "epsilon",
              "scheduler": SCHED},
    "data": {"name": "toy2d"},
    "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "log_with": "none",
              "num_threads": 1},
}


def toy_config(**train):
    raw = json.loads(json.dumps(TOY))
    raw["train"].update(train)
    return validate(raw)


def fit(run_dir, resume=False, max_steps=None, **train) -> Trainer:
    t = Trainer(toy_config(**train), method_class("denoising"), Path(run_dir), max_steps=max_steps, resume=resume,
                show_progress=False)
    t.fit()
    return t


def state_of(t: Trainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in t.params["model"]}
    out.update({f"ema/{i}": p.clone() for i, p in enumerate(t.emas["model"].shadow_params)})
    return out


def rows(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in ("wall_s", "cpu_s", "it_per_s")}
            for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def cli(capsys, *args) -> tuple[int, list[str]]:
    """``stepdistill ARGS`` in this process: (exit code, non-empty stderr lines)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    t = fit(tmp_path_factory.mktemp("full") / "run")
    return state_of(t), rows(t.run_dir)


@pytest.fixture
def toy_yaml(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(TOY))
    return p


@pytest.fixture(autouse=True)
def _no_pending_signal():
    signals.reset()
    yield
    signals.reset()


# ---- checkpoints: never non-finite, verified on resume --------------------------------------------------------
def poison_at(monkeypatch, step: int):
    """The model's first weight becomes NaN in the after-step hook of ``step`` (losses stay finite until then)."""
    def after_step(self, s):
        if s == step:
            with torch.no_grad():
                next(self.net.parameters()).fill_(float("nan"))
        return ()
    monkeypatch.setattr(DenoisingMethod, "after_step", after_step)


def test_nonfinite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    poison_at(monkeypatch, 3)  # step 4's checkpoint would hold them
    with pytest.raises(TrainingFault, match=r"non-finite weights at step 4 \(.*NaN/inf.*model/.*\), not "
                                            r"checkpointed; last good checkpoint: .*step-0000002$"):
        fit(tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"]  # nothing of step 4, no staging folder
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_poisoned_checkpoint_is_neither_named_nor_resumed(tmp_path, monkeypatch, capsys):
    """A checkpoint holding NaN weights (as written before weights were checked, without file hashes) is not the
    'last good checkpoint' of a later non-finite loss, and a resume skips it."""
    fit(tmp_path / "run", max_steps=4)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000004"
    weights = load_file(ckpt / "weights.safetensors")
    weights[next(iter(weights))].fill_(float("nan"))
    from safetensors.torch import save_file

    save_file(weights, ckpt / "weights.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k not in ("files", "state_sha256")}))
    with pytest.raises(CorruptCheckpoint, match="non-finite"):
        verify(ckpt)

    real = DenoisingMethod.losses

    def nan_loss(self, batch, phase):
        out = real(self, batch, phase)
        return {**out, "denoise": out["denoise"] * float("nan")}
    monkeypatch.setattr(DenoisingMethod, "losses", nan_loss)
    t = Trainer(toy_config(), method_class("denoising"), tmp_path / "run", show_progress=False)
    with pytest.raises(TrainingFault, match=r"non-finite loss 'denoise' at step 0 .*last good checkpoint: "
                                            r".*step-0000002$"):
        t.fit()
    monkeypatch.setattr(DenoisingMethod, "losses", real)
    resumed = fit(tmp_path / "run", resume=True, steps=6, max_steps=3)
    assert resumed.step == 3  # from step 2, not the poisoned step 4
    assert "skipping checkpoint" in capsys.readouterr().err


def corrupt(ckpt: Path, how: str) -> None:
    weights = ckpt / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        weights.write_bytes(data[:-7])
    elif how == "bit flip in tensor data":
        data[-5] ^= 0x40
        weights.write_bytes(data)
    elif how == "garbage header":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    elif how == "torn state.json":
        (ckpt / "state.json").write_text((ckpt / "state.json").read_text()[:40])
    elif how == "altered state.json":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "step": state["step"] + 1}))


@pytest.mark.parametrize("how", ["truncated", "bit flip in tensor data", "garbage header", "torn state.json",
                                 "altered state.json"])
def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, how, uninterrupted, capsys):
    fit(tmp_path / "run", max_steps=6)
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-0000006"
    corrupt(latest, how)
    final = fit(tmp_path / "run", resume=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "skipping checkpoint" in warnings[0] and "step-0000006" in warnings[0], warnings
    assert (tmp_path / "run" / "checkpoints" / ".corrupt-step-0000006").is_dir()  # set aside, not deleted
    want_state, want_rows = uninterrupted
    got = state_of(final)
    assert all(torch.equal(want_state[k], got[k]) for k in want_state)  # resumed from step 4 == uninterrupted
    assert rows(tmp_path / "run") == want_rows


def test_a_crash_inside_a_checkpoint_write_resumes_exactly(tmp_path, uninterrupted, monkeypatch):
    """Killed half-way through writing step 6 (its staging folder stays behind): the resume starts from step 4,
    removes the staging folder and ends where an uninterrupted run ends."""
    def killed(*a, **k):
        raise SystemExit("killed")  # not an OSError: nothing cleans up, as after kill -9
    fit(tmp_path / "run", max_steps=4)
    monkeypatch.setattr("stepdistill.training.loop.write_ema", killed)
    with pytest.raises(SystemExit):
        fit(tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step-0000006").is_dir()
    monkeypatch.undo()
    final = fit(tmp_path / "run", resume=True)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    want_state, want_rows = uninterrupted
    got = state_of(final)
    assert all(torch.equal(want_state[k], got[k]) for k in want_state)
    assert rows(tmp_path / "run") == want_rows


def test_checkpoints_record_their_hashes(tmp_path):
    fit(tmp_path / "run", max_steps=2)
    ckpt = latest_checkpoint(tmp_path / "run")
    state = verify(ckpt)
    assert set(state["files"]) == {p.name for p in ckpt.iterdir()} - {"state.json"}


# ---- signals ------------------------------------------------------------------------------------------------
def test_a_stop_request_checkpoints_the_step_and_resume_is_exact(tmp_path, uninterrupted, monkeypatch):
    """SIGTERM / SIGINT inside the loop: the step ends, a checkpoint is written (step 3, off the checkpoint and
    log grid), Interrupted is raised; the resumed run equals an uninterrupted one, metrics rows included."""
    def after_step(self, s):
        if s == 2:
            signals.request(signal.SIGTERM)
        return ()
    monkeypatch.setattr(DenoisingMethod, "after_step", after_step)
    with pytest.raises(signals.Interrupted) as stop:
        fit(tmp_path / "run")
    assert stop.value.exit_code == 143
    assert latest_checkpoint(tmp_path / "run").name == "step-0000003"
    monkeypatch.undo()
    signals.reset()
    final = fit(tmp_path / "run", resume=True)
    want_state, want_rows = uninterrupted
    got = state_of(final)
    assert all(torch.equal(want_state[k], got[k]) for k in want_state)
    assert rows(tmp_path / "run") == want_rows


def start_training(tmp_path, toy_yaml, *overrides):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "stepdistill", "pretrain", str(toy_yaml), "train.steps=1000000",
                             "train.checkpoint_every=1000000", "train.log_every=1", *overrides, "--out", str(out),
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_training_saves_a_checkpoint(tmp_path, toy_yaml, sig, code):
    proc, out = start_training(tmp_path, toy_yaml)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and verify(ckpt)["step"] >= 1
    assert f"stopped by {sig.name}" in lines[0] and str(ckpt) in lines[0] and "--resume" in lines[0]
    assert not (out / LOCK_FILE).exists()


def test_signal_before_training_is_one_line(tmp_path, toy_yaml):
    proc, out = start_training(tmp_path, toy_yaml)
    time.sleep(0.8)  # importing torch, building the run
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["stepdistill: stopped by SIGINT"]
    assert not (out / LOCK_FILE).exists()


# ---- the run-directory lock --------------------------------------------------------------------------------
def test_a_second_training_into_a_run_directory_is_refused(tmp_path, toy_yaml, capsys):
    out = tmp_path / "run"
    with RunLock(out):  # another training holds it
        code, lines = cli(capsys, "pretrain", toy_yaml, "--out", out, "--resume", "--quiet")
        assert code == 2 and len(lines) == 1
        assert "is in use by pid" in lines[0] and "choose another --out" in lines[0]
    assert not out.exists()  # the holder leaves nothing behind


def test_a_stale_lock_is_taken_over(tmp_path, toy_yaml, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone"}))  # its process was killed -9
    code, lines = cli(capsys, "pretrain", toy_yaml, "--out", out, "--resume", "--max-steps", "1", "--quiet")
    assert code == 0 and lines == ["stepdistill: taking over the stale lock of pid 999999 on host gone "
                                   "(no longer running)"]
    assert not (out / LOCK_FILE).exists()


# ---- metrics ------------------------------------------------------------------------------------------------
def test_no_duplicate_metrics_after_a_kill_before_the_first_checkpoint(tmp_path, uninterrupted, monkeypatch):
    def after_step(self, s):
        if s == 4:
            raise RuntimeError("killed")  # as kill -9 would, after rows of steps 2 and 4, with no checkpoint
        return ()
    monkeypatch.setattr(DenoisingMethod, "after_step", after_step)
    with pytest.raises(RuntimeError):
        fit(tmp_path / "run", checkpoint_every=100)
    assert [r["step"] for r in rows(tmp_path / "run")] == [2, 4]
    assert latest_checkpoint(tmp_path / "run") is None
    monkeypatch.undo()
    fit(tmp_path / "run", resume=True, checkpoint_every=100)
    assert [r["step"] for r in rows(tmp_path / "run")] == [2, 4, 6, 8]


def test_a_torn_metrics_row_is_dropped_on_resume(tmp_path, uninterrupted):
    fit(tmp_path / "run", max_steps=4)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "model/den')  # killed while writing the row of step 6
    fit(tmp_path / "run", resume=True)
    assert rows(tmp_path / "run") == uninterrupted[1]


# ---- full disks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])
def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, toy_yaml, monkeypatch, capsys, error):
    import safetensors.torch as st
    from safetensors import SafetensorError

    code, _ = cli(capsys, "pretrain", toy_yaml, "--out", tmp_path / "run", "--max-steps", "2", "--quiet")
    assert code == 0
    good = latest_checkpoint(tmp_path / "run")
    stale = tmp_path / "run" / "checkpoints" / ".tmp-step-0000099"  # left by an earlier failed write
    stale.mkdir()
    real = st.save_file

    def full(tensors, path, *a, **k):
        if "ema" in str(path):
            raise (OSError(errno.ENOSPC, "No space left on device") if error == "OSError" else
                   SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(st, "save_file", full)
    code, lines = cli(capsys, "pretrain", toy_yaml, "--out", tmp_path / "run", "--resume", "--quiet")
    assert code == 1 and len(lines) == 1
    assert "cannot write" in lines[0] and "step-0000004" in lines[0] and "No space left on device" in lines[0]
    assert "free there" in lines[0] and f"last good checkpoint: {good}" in lines[0]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the partial and the stale one
    assert latest_checkpoint(tmp_path / "run") == good and verify(good)["step"] == 2


# ---- bad inputs: one line, exit code 2 --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the table below points at: configs, a finished LoRA student run and damaged copies of it."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "toy.yaml").write_text(yaml.safe_dump(TOY))
    (d / "dmd.yaml").write_text(yaml.safe_dump(DMD))
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "afile").write_text("not a folder")
    (d / "prompts.txt").write_bytes(b"a cat\n\xff\xfe a dog\n")
    assert main(["train", str(d / "dmd.yaml"), "--out", str(d / "run"), "--quiet"]) == 0
    lora = d / "run" / "student" / "pytorch_lora_weights.safetensors"
    assert lora.exists()

    def damaged(name, edit):
        shutil.copytree(d / "run", d / name)
        edit(d / name / "student")
    damaged("torn_lora", lambda s: (s / lora.name).write_bytes(lora.read_bytes()[:-9]))
    damaged("torn_lora_header", lambda s: (s / lora.name).write_bytes(lora.read_bytes()[:200]))

    def recipe(**update):
        def edit(s):
            r = json.loads((s / "sampling.json").read_text())
            (s / "sampling.json").write_text(json.dumps({**r, **update}))
        return edit
    damaged("t5000", recipe(scheduler="EulerDiscreteScheduler", timesteps=[5000]))
    damaged("t_negative", recipe(timesteps=[-1]))
    damaged("not_a_scheduler", recipe(scheduler="StableDiffusionPipeline"))
    damaged("binary_recipe", lambda s: (s / "sampling.json").write_bytes(b"\xff\xfe\x00"))
    damaged("network_outside", recipe(networks={"student": {"format": "lora", "path": "../../.."}}))
    return d


D = "{d}"  # the inputs folder in the table
BAD_INPUTS = [  # (id, argv, what the line must say)
    # train / pretrain: config files and values
    ("binary config", ["train", f"{D}/binary.yaml"], "not a UTF-8 YAML config"),
    ("missing config", ["train", f"{D}/missing.yaml"], "config file not found"),
    ("pretrain binary config", ["pretrain", f"{D}/binary.yaml"], "not a UTF-8"),
    ("betas > 1", ["train", f"{D}/dmd.yaml", "train.optim.betas=[2,3]", "--dry-run"], "each beta must be in [0, 1)"),
    ("negative beta", ["train", f"{D}/dmd.yaml", "train.optim.betas=[-0.1,0.9]", "--dry-run"], "[0, 1)"),
    ("one beta", ["train", f"{D}/dmd.yaml", "train.optim.betas=[0.9]", "--dry-run"], "train.optim.betas"),
    ("lr inf", ["train", f"{D}/dmd.yaml", "train.optim.lr=inf", "--dry-run"], "finite"),
    ("lr nan", ["train", f"{D}/dmd.yaml", "train.optim.lr=.nan", "--dry-run"], "train.optim.lr"),
    ("lr 0", ["train", f"{D}/dmd.yaml", "train.optim.lr=0", "--dry-run"], "greater than 0"),
    ("grad_clip inf", ["train", f"{D}/dmd.yaml", "train.optim.grad_clip=.inf", "--dry-run"], "finite"),
    ("per-network lr inf", ["train", f"{D}/dmd.yaml", "train.optim_per_network.student.lr=.inf", "--dry-run"],
     "optim_per_network.student"),
    ("per-network key typo", ["train", f"{D}/dmd.yaml", "train.optim_per_network.student.lrr=1", "--dry-run"],
     "unknown key(s) ['lrr']"),
    ("per-network network typo", ["train", f"{D}/dmd.yaml", "train.optim_per_network.fake_scroe.lr=1", "--out",
                                  f"{D}/typo", "--quiet"], "'fake_scroe', which this method does not train"),
    ("timestep -1", ["train", f"{D}/dmd.yaml", "method.timesteps=[-1]", "--dry-run"], ">= 0"),
    ("timesteps increasing", ["train", f"{D}/dmd.yaml", "method.timesteps=[499,999]", "--dry-run"], "decreasing"),
    ("timestep 1000", ["train", f"{D}/dmd.yaml", "method.timesteps=[1000]", "--out", f"{D}/t1000", "--quiet"],
     "exceed"),
    ("unknown key", ["train", f"{D}/dmd.yaml", "train.setps=3", "--dry-run"], "train.steps"),
    ("--out is a file", ["train", f"{D}/dmd.yaml", "--out", f"{D}/afile"], "is a file"),
    ("--out under a file", ["train", f"{D}/dmd.yaml", "--out", f"{D}/afile/run"], "cannot create run directory"),
    ("pretrain --out is a file", ["pretrain", f"{D}/toy.yaml", "--out", f"{D}/afile"], "is a file"),
    ("--max-steps 0", ["pretrain", f"{D}/toy.yaml", "--max-steps", "0", "--out", f"{D}/m0"], "--max-steps"),
    ("existing run", ["train", f"{D}/dmd.yaml", "--out", f"{D}/run"], "--resume"),
    ("asset outside the registry", ["train", f"{D}/dmd.yaml", "model.init=asset:../../README.md", "--out",
                                    f"{D}/a1", "--quiet"], "unknown asset '../../README.md'"),
    ("absolute asset", ["train", f"{D}/dmd.yaml", "model.init=asset:/etc", "--out", f"{D}/a2", "--quiet"],
     "unknown asset '/etc'"),
    # sample
    ("sample --steps -1", ["sample", "--run", f"{D}/run", "--steps", "-1", "--out", f"{D}/s"], "--steps -1"),
    ("sample --steps 0", ["sample", "--run", f"{D}/run", "--steps", "0", "--out", f"{D}/s"], "--steps 0"),
    ("sample --labels 42 on digits", ["sample", "--model", "digits", "--labels", "42", "--out", f"{D}/s"],
     "class 0..9"),
    ("sample --labels -1 on digits-sd", ["sample", "--model", "digits-sd", "--labels", "-1", "--out", f"{D}/s"],
     "class 0..9"),
    ("sample --labels words", ["sample", "--model", "digits", "--labels", "one,two", "--out", f"{D}/s"],
     "comma-separated integers"),
    ("sample --num 0", ["sample", "--run", f"{D}/run", "--num", "0", "--out", f"{D}/s"], "--num"),
    ("sample --out is a file", ["sample", "--run", f"{D}/run", "--out", f"{D}/afile"], "is a file"),
    ("sample truncated LoRA", ["sample", "--run", f"{D}/torn_lora", "--out", f"{D}/s"], "not a readable safetensors"),
    ("sample LoRA with a torn header", ["sample", "--run", f"{D}/torn_lora_header", "--out", f"{D}/s"],
     "not a readable safetensors"),
    ("sample timestep 5000", ["sample", "--run", f"{D}/t5000", "--num", "2", "--out", f"{D}/s"],
     "timesteps [5000] lie outside the schedule's [0, 1000)"),
    ("sample timestep -1", ["sample", "--run", f"{D}/t_negative", "--out", f"{D}/s"], ">= 0"),
    ("sample pipeline as scheduler", ["sample", "--run", f"{D}/not_a_scheduler", "--out", f"{D}/s"],
     "unknown scheduler 'StableDiffusionPipeline'"),
    ("sample binary sampling.json", ["sample", "--run", f"{D}/binary_recipe", "--out", f"{D}/s"], "not a UTF-8"),
    ("sample network path outside", ["sample", "--run", f"{D}/network_outside", "--out", f"{D}/s"],
     "lies outside"),
    ("sample missing run", ["sample", "--run", f"{D}/nowhere", "--out", f"{D}/s"], "run directory not found"),
    # eval
    ("eval truncated LoRA", ["eval", "--run", f"{D}/torn_lora", "--out", f"{D}/e", "--num-samples", "4"],
     "not a readable safetensors"),
    ("eval non-UTF-8 prompts", ["eval", "--model", "toy2d", "--benchmark", "generic", "--prompts",
                                f"{D}/prompts.txt", "--steps", "1", "--num-samples", "4", "--out", f"{D}/e"],
     "not a UTF-8 prompt file"),
    ("eval --recipe outside the student", ["eval", "--run", f"{D}/run", "--recipe", "../../config.yaml", "--out",
                                          f"{D}/e"], "--recipe"),
    ("eval --out is a file", ["eval", "--run", f"{D}/run", "--out", f"{D}/afile"], "is a file"),
    ("eval --steps 0", ["eval", "--model", "toy2d", "--steps", "0", "--out", f"{D}/e"], "--steps"),
    ("eval --scheduler not a scheduler", ["eval", "--model", "toy2d", "--steps", "1", "--scheduler", "UNet2DModel",
                                          "--num-samples", "4", "--no-speed", "--out", f"{D}/e"], "unknown scheduler"),
    ("eval timestep 5000", ["eval", "--run", f"{D}/t5000", "--num-samples", "4", "--no-speed", "--out", f"{D}/e"],
     "lie outside"),
    # assets
    ("assets build outside the registry", ["assets", "build", "../x"], "unknown asset"),
]


@pytest.mark.parametrize("argv,says", [pytest.param(a, s, id=i) for i, a, s in BAD_INPUTS])
def test_bad_input_is_one_line_with_exit_code_2(inputs, capsys, argv, says):
    code, lines = cli(capsys, *[a.replace(D, str(inputs)) for a in argv], *(["--quiet"] if argv[0] == "eval" else []))
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("stepdistill: error: ") and says in lines[0], lines[0]


def test_a_non_utf8_prompt_file_for_training_is_one_line(tmp_path):
    from stepdistill.config import PromptsData
    from stepdistill.data.prompts import PromptSource

    (tmp_path / "p.txt").write_bytes(b"a cat\n\xff a dog\n")
    with pytest.raises(UsageError, match=r"p.txt is not a UTF-8 prompt file \(data.file\)"):
        PromptSource(PromptsData(file=str(tmp_path / "p.txt")))


def test_manifest_files_stay_inside_their_asset(tmp_path):
    from stepdistill import assets

    folder = tmp_path / "tiny"
    folder.mkdir()
    (tmp_path / "secret").write_text("x" * 7)
    (folder / "asset.json").write_text(json.dumps({"files": {"../secret": {"bytes": 1, "sha256": "0"}}}))
    with pytest.raises(UsageError, match="outside the asset folder"):
        assets.path("tiny", tmp_path)


def test_train_help_example_validates(toy_yaml):
    from stepdistill.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    example = re.search(r"e\.g\.\s+(.*?)\s+\(values", text, re.S).group(1).split()
    assert example
    raw = yaml.safe_load(Path(ROOT / "configs/toy2d/dmd.yaml").read_text())
    from stepdistill.config import apply_override

    for item in example:
        apply_override(raw, item)
    validate(raw)
