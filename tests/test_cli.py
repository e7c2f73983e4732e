"""The command line: help, one-line usage errors with exit code 2, run directories, bf16 and many processes."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli

TOY = {
    "method": {"name": "denoising", "cond_dropout": 0.0},
    "model": {"arch": {"dim": 2, "hidden": 32, "depth": 1}, "kind": "mlp", "prediction_type": "epsilon"},
    "data": {"name": "toy2d"},
    "train": {"steps": 6, "batch_size": 32, "checkpoint_every": 3, "log_every": 3, "log_with": "none"},
}


@pytest.fixture
def toy_yaml(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(TOY))
    return p


def one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for sub in ("train", "pretrain"):
        assert sub in r.stdout
    r = run_cli("train", "--help")
    assert "--max-steps" in r.stdout and "--resume" in r.stdout and "key=value" in r.stdout


def test_missing_config_exits_2(tmp_path):
    line = one_line_error(run_cli("train", tmp_path / "missing.yaml"))
    assert "config file not found" in line


def test_unknown_override_names_key(toy_yaml, tmp_path):
    line = one_line_error(run_cli("pretrain", toy_yaml, "train.setps=3", "--out", tmp_path / "r"))
    assert "'train.setps'" in line and "train.steps" in line


def test_wrong_type_and_wrong_subcommand(toy_yaml, tmp_path):
    line = one_line_error(run_cli("pretrain", toy_yaml, "train.batch_size=many", "--out", tmp_path / "r"))
    assert "train.batch_size" in line and "integer" in line
    line = one_line_error(run_cli("train", toy_yaml, "--out", tmp_path / "r"))
    assert "stepdistill pretrain" in line
    line = one_line_error(run_cli("pretrain", toy_yaml, "--bogus-flag"))
    assert "--bogus-flag" in line


def test_dry_run_prints_resolved_config(toy_yaml, tmp_path):
    r = run_cli("pretrain", toy_yaml, "train.steps=9", "--dry-run", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["train"]["steps"] == 9 and cfg["train"]["optim"]["lr"] == 1e-4
    assert not (tmp_path / "r").exists()


def test_run_dir_is_never_overwritten_silently(toy_yaml, tmp_path):
    out = tmp_path / "r"
    r = run_cli("pretrain", toy_yaml, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6
    line = one_line_error(run_cli("pretrain", toy_yaml, "--out", out))
    assert "--overwrite" in line and "--resume" in line
    r = run_cli("pretrain", toy_yaml, "train.steps=3", "--out", out, "--overwrite", "--quiet")
    assert r.returncode == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 3


def test_bf16_autocast_runs_on_cpu(toy_yaml, tmp_path):
    out = tmp_path / "r"
    r = run_cli("pretrain", toy_yaml, "train.precision=bf16", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["model/denoise"]) < 10 for r in rows)


def test_xformers_on_cpu_is_a_usage_error(tmp_path):
    from stepdistill.attention import set_attention, xformers_available
    from stepdistill.errors import UsageError
    from diffusers import UNet2DConditionModel

    net = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                               layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    assert set_attention(net, "auto", "cpu") == "sdpa"
    with pytest.raises(UsageError, match="xformers"):
        set_attention(net, "xformers", "cpu")
    assert set_attention(net, "sdpa", "cpu") == "sdpa"
    _ = xformers_available


def test_accelerate_launch_two_processes(toy_yaml, tmp_path):
    """DDP-style data parallel on CPU (gloo): artifacts written once, parameters identical across ranks."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stepdistill", "pretrain",
           str(toy_yaml), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = out / "checkpoints" / "step-0000006"
    assert {p.name for p in ckpt.iterdir()} >= {"rng_rank0.safetensors", "rng_rank1.safetensors", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["num_processes"] == 2
    (rank0,), (rank1,) = state["replica_checksums"]
    assert rank0 == rank1  # gradients were averaged: the replicas stayed identical
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # logged once (main process), at steps 3 and 6
    assert (out / "export" / "model.safetensors").exists()
    assert r.stdout.count("wrote") == 1
