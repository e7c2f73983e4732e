"""The training loop: exact resume, atomic checkpoints, non-finite losses, update phases."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import validate
from stepdistill.errors import TrainingFault
from stepdistill.trainers import Trainer, method_class
from stepdistill.training import latest_checkpoint

TOY = {
    "method": {"name": "denoising", "cond_dropout": 0.0},
    "model": {"arch": {"dim": 2, "hidden": 32, "depth": 1}, "kind": "mlp", "prediction_type": "epsilon"},
    "data": {"name": "toy2d"},
    "train": {"steps": 20, "batch_size": 32, "checkpoint_every": 5, "keep_checkpoints": 2, "log_every": 5,
              "log_with": "none", "optim": {"lr": 1e-2, "warmup_steps": 3}, "ema": {"decay": 0.9}},
}


def toy_config(**train):
    raw = json.loads(json.dumps(TOY))
    raw["train"].update(train)
    return validate(raw)


def run(run_dir, max_steps=None, resume=False, **train):
    cfg = toy_config(**train)
    t = Trainer(cfg, method_class("denoising"), Path(run_dir), max_steps=max_steps, resume=resume,
                show_progress=False)
    t.fit()
    return t


def final_state(t: Trainer):
    params = {n: p.detach().clone() for n, p in t.params["model"]}
    ema = [p.clone() for p in t.emas["model"].shadow_params]
    return params, ema


def same(a, b):
    pa, ea = a
    pb, eb = b
    return all(torch.equal(pa[k], pb[k]) for k in pa) and all(torch.equal(x, y) for x, y in zip(ea, eb))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return final_state(run(tmp_path_factory.mktemp("full") / "run"))


def test_resume_matches_uninterrupted(tmp_path, uninterrupted):
    run(tmp_path / "run", max_steps=10)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000010"
    resumed = run(tmp_path / "run", resume=True)
    assert resumed.step == 20
    assert same(final_state(resumed), uninterrupted)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    walls = [r["wall_s"] for r in rows]  # training time counts on across the resume
    assert walls == sorted(walls) and rows[-1]["cpu_s"] > 0


def test_resume_forgets_metrics_logged_after_the_checkpoint(tmp_path):
    run(tmp_path / "run", max_steps=10)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:  # a crash after logging step 15 but before its checkpoint
        f.write(json.dumps({"step": 15, "loss": 123.0}) + "\n")
    run(tmp_path / "run", resume=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r.get("loss") != 123.0 for r in rows)


@pytest.mark.parametrize("skip", ["_load_optimizers", "_load_ema", "_load_rng", "_load_weights", "step"])
def test_resume_test_would_catch_missing_state(tmp_path, uninterrupted, monkeypatch, skip):
    """The resume check above is not vacuous: dropping any piece of state changes the result."""
    run(tmp_path / "run", max_steps=10)
    if skip == "step":
        orig = Trainer._load_latest

        def no_step(self):
            orig(self)
            self.step = 0
        monkeypatch.setattr(Trainer, "_load_latest", no_step)
    else:
        monkeypatch.setattr(Trainer, skip, lambda self, *a: None)
    resumed = run(tmp_path / "run", resume=True)
    assert not same(final_state(resumed), uninterrupted)


def test_checkpoints_pruned_and_complete(tmp_path):
    run(tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000015", "step-0000020"]
    c = tmp_path / "run" / "checkpoints" / "step-0000020"
    assert {p.name for p in c.iterdir()} == {"weights.safetensors", "optimizer.safetensors", "ema.safetensors",
                                            "rng_rank0.safetensors", "state.json"}
    assert json.loads((c / "state.json").read_text())["step"] == 20
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "export" / "model.safetensors").exists()


def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run(tmp_path / "run", max_steps=5)
    good = latest_checkpoint(tmp_path / "run")
    before = load_file(good / "weights.safetensors")
    import safetensors.torch as st

    calls = {"n": 0}
    real = st.save_file

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if "optimizer" in str(path):
            raise OSError("disk full")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(TrainingFault, match=r"cannot write .*step-0000010 \(disk full; .* free there\); last good "
                                            r"checkpoint: .*step-0000005"):
        run(tmp_path / "run", resume=True)
    assert latest_checkpoint(tmp_path / "run") == good
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the staging folder is gone
    after = load_file(good / "weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_loss_stops_with_named_loss(tmp_path, monkeypatch):
    from stepdistill.trainers.denoising import DenoisingMethod

    real = DenoisingMethod.losses
    state = {"calls": 0}

    def poisoned(self, batch, phase):
        state["calls"] += 1
        out = real(self, batch, phase)
        if state["calls"] == 8:
            out["denoise"] = out["denoise"] * float("nan")
        return out
    monkeypatch.setattr(DenoisingMethod, "losses", poisoned)
    with pytest.raises(TrainingFault, match=r"non-finite loss 'denoise' at step 7 .*step-0000005"):
        run(tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-0000005"
    assert not (tmp_path / "run" / "export").exists()


def test_phases_follow_their_schedule():
    from stepdistill.training import Phase

    p = Phase("student", ("student",), every=5)
    assert [s for s in range(12) if p.runs_at(s)] == [0, 5, 10]


def _linear_method(rows_per_batch):
    """A custom Method on a fixed dataset: micro-batch i of a step is rows [i*B, (i+1)*B) of X."""
    from stepdistill.training import Method, Phase

    X = torch.arange(8, dtype=torch.float32).reshape(4, 2) / 7
    Y = X @ torch.tensor([[1.0], [-2.0]]) + 0.5

    class LinearFit(Method):
        name = "denoising"  # reuse a registered config schema; the method itself is custom
        kind = "pretrain"
        export_network = "w"

        def __init__(self, cfg, ctx):
            super().__init__(cfg, ctx)
            torch.manual_seed(0)
            self.w = torch.nn.Linear(2, 1)
            self.i = 0

        def networks(self):
            return {"w": self.w}

        def phases(self):
            return [Phase("fit", ("w",))]

        def batch(self, phase):
            lo = (self.i * rows_per_batch) % 4
            self.i += 1
            return X[lo:lo + rows_per_batch], Y[lo:lo + rows_per_batch]

        def losses(self, batch, phase):
            x, y = batch
            return {"denoise": ((self.w(x) - y) ** 2).squeeze(-1)}

        def export(self, out_dir):
            pass
    return LinearFit


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Two micro-batches of 2 rows give the same update as one batch of 4 rows."""
    results = []
    for rows, accum in ((4, 1), (2, 2)):
        cfg = toy_config(steps=3, grad_accum=accum, checkpoint_every=100)
        t = Trainer(cfg, _linear_method(rows), None, show_progress=False)
        t.fit()
        results.append(torch.cat([p.detach().flatten() for p in t.method.w.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert not torch.allclose(results[0], torch.cat([p.detach().flatten() for p in torch.nn.Linear(2, 1).parameters()]))
