"""Several processes on the CPU (gloo), started from the test with torch.multiprocessing or through the command
line: ddp equals one process with twice the batch; LoRA adapters on one shared base stay identical replicas;
fsdp trains, checkpoints, resumes and exports what ddp does; ``accelerate launch --cpu --num_processes 2`` runs
two processes; ``--dry-run`` counts parameters and estimates memory per process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
import yaml

from conftest import ROOT, run_cli
from stepdistill import losses as L
from stepdistill import registry
from stepdistill.config import validate
from stepdistill.errors import UsageError
from stepdistill.trainers.denoising import DenoisingMethod
from stepdistill.training import Trainer
from test_methods import TINY, TRAIN

STEPS, CUT = 4, 3


# ---- running processes -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, ports: list[int], job, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    job(ports, *args)


def run_processes(job, *args, runs: int = 1, world: int = 2) -> None:
    """``job(ports, *args)`` in ``world`` processes of one process group per run (a fresh port each: a run's
    Trainer ends its process group)."""
    ports = [free_port() for _ in range(runs)]
    torch.multiprocessing.spawn(_process, args=(world, ports, job, args), nprocs=world, join=True)


def fit(cfg, out: Path, port: int | None = None, method_cls=None, **kw) -> Trainer:
    from accelerate.state import AcceleratorState

    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    t = Trainer(cfg, method_cls or registry.method_class(cfg.method.name), out, show_progress=False, **kw)
    t.fit()
    AcceleratorState._reset_state(reset_partial_state=True)
    return t


def tiny(name: str, **train) -> object:
    raw = json.loads(json.dumps(TINY[name]))
    return validate({**raw, "train": {**TRAIN, "steps": STEPS, **train}})


def final_files(run: Path, file: str = "weights") -> dict[str, torch.Tensor]:
    return st.load_file(sorted((run / "checkpoints").glob("step-*"))[-1] / f"{file}.safetensors")


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k].double() - b[k].double()).abs().max()), k) for k in a)
    assert worst[0] <= atol, worst


# ---- (a) ddp equals one process with twice the batch ------------------------------------------------------------
class SlicedDenoising(DenoisingMethod):
    """Plain denoising whose every batch (data, timesteps, noise) is this process's slice of one batch drawn alike
    on every process, from a generator seeded the same everywhere: W processes of B samples see exactly what one
    process of W * B samples sees."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.shared = torch.Generator().manual_seed(cfg.train.seed + 1)

    def batch(self, phase):
        W, r, B = self.ctx.num_processes, self.ctx.process_index, self.cfg.train.batch_size
        x0 = self.data.sample(W * B, self.shared).x0
        t = torch.randint(0, self.bundle.schedule.num_train_timesteps, (W * B,), generator=self.shared)
        eps = torch.randn(x0.shape, generator=self.shared)
        mine = slice(r * B, (r + 1) * B)
        return x0[mine], t[mine], eps[mine]

    def losses(self, batch, phase):
        x0, t, eps = batch
        x_t = self.bundle.schedule.add_noise(x0, eps, t)
        target = self.bundle.schedule.target(x0, eps, t, self.denoiser.prediction_type)
        return {"denoise": L.mse(self.denoiser.predict(x_t, t).float(), target.float())}


def sliced_config(batch_size: int):
    return validate({"method": {"name": "denoising", "cond_dropout": 0.0},
                     "model": {"arch": {"dim": 2, "hidden": 16, "depth": 2}, "kind": "mlp",
                               "prediction_type": "epsilon"},
                     "data": {"name": "toy2d"},
                     "train": {**TRAIN, "steps": 3, "batch_size": batch_size, "grad_accum": 2, "ema": {"decay": None},
                               "distributed": {"strategy": "ddp", "bucket_mb": 0.001}}})  # several buckets


def _sliced_job(ports, out):
    fit(sliced_config(8), Path(out), ports[0], method_cls=SlicedDenoising)


@pytest.mark.slow  # two processes that each import torch, diffusers and peft: ~35 s on 2 busy cores
def test_ddp_equals_one_process_with_twice_the_batch(tmp_path):
    one = fit(sliced_config(16), tmp_path / "one", method_cls=SlicedDenoising)
    assert one.strategy == "none"
    run_processes(_sliced_job, str(tmp_path / "two"))
    state = json.loads((sorted((tmp_path / "two" / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    assert state["num_processes"] == 2 and state["strategy"] == "ddp"
    torch.manual_seed(0)  # the initial network, as the loop seeds it
    start = {f"model/{n}": p.detach() for n, p in SlicedDenoising(sliced_config(16), one.ctx).net.named_parameters()}
    two, single = final_files(tmp_path / "two"), final_files(tmp_path / "one")
    assert_close(two, single, 1e-5)
    assert max(float((single[k] - start[k]).abs().max()) for k in single) > 1e-3  # it trained
    assert_close(final_files(tmp_path / "two", "optimizer"), final_files(tmp_path / "one", "optimizer"), 1e-5)


# ---- ddp with LoRA adapters on one shared base; fsdp refuses them -------------------------------------------------
def lora_dmd(strategy: str):
    raw = json.loads(json.dumps(TINY["dmd"]))
    raw["method"].update(student={"lora": {"rank": 4}}, fake_score={"lora": {"rank": 4}}, shared_base=True)
    return validate({**raw, "train": {**TRAIN, "steps": STEPS, "distributed": {"strategy": strategy}}})


def _lora_job(ports, out):
    out = Path(out)
    t = fit(lora_dmd("ddp"), out / "ddp", ports[0])
    assert t.method.student.module is t.method.fake.module  # one base carries both adapters
    try:
        fit(lora_dmd("fsdp"), out / "fsdp", ports[1])
    except UsageError as e:
        if int(os.environ["RANK"]) == 0:
            (out / "refused.txt").write_text(str(e))


def test_ddp_shared_base_lora_replicas_stay_identical_and_fsdp_refuses_it(tmp_path):
    run_processes(_lora_job, str(tmp_path), runs=2)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / f"step-{STEPS:07d}" / "state.json").read_text())
    (rank0, rank1) = state["replica_checksums"]  # each process drew its own batches: only averaging keeps them equal
    assert rank0 == rank1
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert {"student/dm", "fake_score/fake", "fake_score/gan_d"} <= set(rows[0]) | set(rows[1])
    refusal = (tmp_path / "refused.txt").read_text()
    assert "LoRA" in refusal and "strategy=ddp" in refusal and "\n" not in refusal


# ---- (b) fsdp: train, checkpoint, resume, export -------------------------------------------------------------------
def _fsdp_job(ports, out):
    out = Path(out)
    fit(tiny("dmd", distributed={"strategy": "ddp"}), out / "ddp", ports[0])
    fit(tiny("dmd", distributed={"strategy": "fsdp"}), out / "fsdp", ports[1])
    fit(tiny("dmd", distributed={"strategy": "fsdp"}), out / "cut", ports[2], max_steps=CUT)
    fit(tiny("dmd", distributed={"strategy": "fsdp"}), out / "cut", ports[3], resume=True)
    _save_sharded_unet(ports[4], out / "unet")


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)


def _save_sharded_unet(port, out):
    """A sharded Diffusers network saved by its own save_pretrained inside ``Sharding.full_weights``."""
    import torch.distributed as dist

    from stepdistill.training.distributed import Sharding

    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo")
    net = tiny_unet()
    sharding = Sharding([net], torch.device("cpu"))
    with sharding.full_weights([net], keep=dist.get_rank() == 0):
        if dist.get_rank() == 0:
            net.save_pretrained(out)
    assert all(type(p).__name__ == "DTensor" for p in net.parameters())  # sharded again
    dist.destroy_process_group()


@pytest.mark.slow  # two processes that each import torch, diffusers and peft: ~35 s on 2 busy cores
def test_fsdp_trains_checkpoints_resumes_and_exports_what_ddp_does(tmp_path):
    """Full fine-tune DMD (student, fake score, GAN head, two-step backward simulation whose step each process
    draws for itself) on two processes: sharded and replicated runs end at the same weights, optimiser and EMA
    states and export the same student; a sharded run stopped at step 3 and resumed ends where it would have."""
    run_processes(_fsdp_job, str(tmp_path), runs=5)
    state = json.loads((tmp_path / "fsdp" / "checkpoints" / f"step-{STEPS:07d}" / "state.json").read_text())
    assert state["strategy"] == "fsdp" and state["num_processes"] == 2
    for file in ("weights", "optimizer", "ema"):
        assert_close(final_files(tmp_path / "fsdp", file), final_files(tmp_path / "ddp", file), 1e-5)
        assert_close(final_files(tmp_path / "cut", file), final_files(tmp_path / "fsdp", file), 1e-6)
    student = lambda run: st.load_file(tmp_path / run / "student" / "model.safetensors")  # noqa: E731
    assert_close(student("fsdp"), student("ddp"), 1e-5)
    assert_close(student("cut"), student("fsdp"), 1e-6)
    from stepdistill.pipelines import load_student

    assert load_student(tmp_path / "fsdp" / "student") is not None  # a plain artifact, loadable as any other
    from diffusers import UNet2DModel

    saved = UNet2DModel.from_pretrained(tmp_path / "unet")  # the class's own name and every weight, whole
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert_close(saved.state_dict(), tiny_unet().state_dict(), 0.0)
    losses = lambda run: [{k: v for k, v in json.loads(x).items() if "/" in k and "/log/" not in k}  # noqa: E731
                          for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses("cut")) == STEPS
    for a, b in zip(losses("cut"), losses("fsdp")):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_fsdp_refuses_methods_it_cannot_shard():
    from stepdistill.training.distributed import fsdp_refusal
    from stepdistill.training.method import Context

    ctx = Context(device=torch.device("cpu"), generator=torch.Generator())
    m = registry.method_class("tscd")(tiny("tscd"), ctx)
    nets = m.networks()
    reason = fsdp_refusal(m, nets, {n: m.trainable(n, net) for n, net in nets.items()})
    assert "tscd" in reason and "strategy=ddp" in reason


# ---- (c) accelerate launch --cpu --num_processes 2 ----------------------------------------------------------------
@pytest.mark.slow  # two processes that each import torch, diffusers and peft: ~35 s on 2 busy cores
def test_accelerate_launch_cpu_runs_two_processes(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({
        "method": {"name": "denoising", "cond_dropout": 0.0},
        "model": {"arch": {"dim": 2, "hidden": 16, "depth": 1}, "kind": "mlp", "prediction_type": "epsilon"},
        "data": {"name": "toy2d"},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "log_with": "none"}}))
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stepdistill", "pretrain", str(cfg), "--out",
           str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stepdistill: 2 processes (ddp, gloo on cpu)" in r.stderr
    ckpt = out / "checkpoints" / "step-0000002"
    assert (ckpt / "rng_rank1.safetensors").exists()  # written by the second process
    assert json.loads((ckpt / "state.json").read_text())["num_processes"] == 2


def test_cpu_relaunch_reads_the_launchers_command_line():
    from stepdistill.launch import cpu_relaunch

    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    launcher = ["/usr/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "4",
                "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "-m", "stepdistill",
                "train", "x.yaml"]
    cmd = cpu_relaunch(["train", "x.yaml"], env, launcher)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-4:] == ["-m", "stepdistill", "train", "x.yaml"]
    assert {"--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=29500"} <= set(cmd)
    one = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "x.py"]
    assert cpu_relaunch([], env, one) is None
    assert cpu_relaunch([], {**env, "RANK": "0"}, launcher) is None  # started by torchrun: every process exists
    assert cpu_relaunch([], {"MASTER_ADDR": "127.0.0.1"}, launcher) is None  # not a CPU launch
    with pytest.raises(UsageError, match="torchrun --nproc_per_node"):
        cpu_relaunch([], env, ["python", "train.py"])


# ---- --dry-run: parameters per network, memory per process --------------------------------------------------------
def test_dry_run_counts_parameters_and_estimates_memory(tmp_path):
    cfg = tmp_path / "dmd.yaml"
    cfg.write_text(yaml.safe_dump({**TINY["dmd"], "train": TRAIN}))
    r = run_cli("train", cfg, "--dry-run", "--num-gpus", "4")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["method"]["name"] == "dmd"  # still a config: the account is comments
    text = r.stdout
    assert "4 processes (--num-gpus)" in text
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("#   ") and len(line.split()) > 2}
    assert lines["student"].split()[2] != "-" and lines["gan_head"].split()[3] == "-"
    assert "full" in lines["fake_score"] and lines["ddp"].split()[-1] != lines["fsdp"].split()[-1]


def test_memory_estimate_of_a_full_sd15_fine_tune_from_the_unet_config():
    """SD1.5's UNet (configs/sd15/unet.json, 859,520,964 parameters) built on the meta device: student and fake
    score full copies, the teacher frozen; per process on 8: ddp holds everything, fsdp an eighth of gradients
    and AdamW states."""
    from stepdistill.config import load_config
    from stepdistill.training.memory import account, build_method

    cfg = load_config(ROOT / "configs/sd15/dmd2_lora.yaml", ["method.student.lora=null", "method.fake_score.lora=null",
                                                             f"data.file={ROOT / 'configs/prompts/coco_style.txt'}"])
    method = build_method(cfg, registry.method_class("dmd"), 8, ROOT / "configs/sd15/unet.json")
    assert next(method.student.module.parameters()).is_meta
    acc = account(method, cfg)
    P = 859_520_964
    assert {r.name: (r.trained, r.frozen) for r in acc.rows} == {"student": (P, 0), "fake_score": (P, 0),
                                                                  "teacher": (0, P)}
    assert acc.fsdp_refusal is None
    ddp, fsdp = acc.per_process("ddp", 8), acc.per_process("fsdp", 8)
    assert ddp["weights"] == fsdp["weights"] == 3 * 4 * P
    assert (ddp["grads"], ddp["adamw"], ddp["ema"]) == (2 * 4 * P, 2 * 8 * P, 0)
    assert (fsdp["grads"], fsdp["adamw"]) == (2 * 4 * P / 8, 2 * 8 * P / 8)


def test_dry_run_of_a_pipeline_folder_counts_its_text_encoder_and_vae(tmp_path):
    from stepdistill.config import load_config
    from stepdistill.testing import tiny_sd_pipeline
    from stepdistill.training.memory import account, build_method

    folder = tiny_sd_pipeline(tmp_path / "sd")
    cfg = load_config(ROOT / "configs/sd15/dmd2_lora.yaml", [f"model.pretrained={folder}",
                                                             f"data.file={ROOT / 'configs/prompts/coco_style.txt'}"])
    acc = account(build_method(cfg, registry.method_class("dmd"), 2), cfg)
    rows = {r.name: r for r in acc.rows}
    assert rows["student"].kind == "LoRA on a frozen base" and rows["teacher"].trained == 0
    assert rows["text encoders, VAE"].frozen > 0 and not acc.notes
    assert "LoRA" in acc.fsdp_refusal


def test_distributed_strategy_is_validated(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**TINY["denoising"], "train": {"distributed": {"strategy": "zero3"}}}))
    r = run_cli("pretrain", p, "--dry-run")
    assert r.returncode == 2 and "train.distributed.strategy" in r.stderr and "'auto', 'ddp' or 'fsdp'" in r.stderr
