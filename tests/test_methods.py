"""One common test over every user-facing method in the registry: a tiny toy2d config each; one step gives
finite losses; a run checkpointed at step K and resumed ends bit for bit where an uninterrupted run ends."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill import registry
from stepdistill.config import validate
from stepdistill.training import Trainer, latest_checkpoint

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
TEACHER = {"pretrained": "toy2d", "arch": {"hidden": 16, "depth": 1}, "prediction_type": "epsilon",
           "scheduler": SCHED}  # the exact mixture teacher; students are tiny MLPs
STEPS, CUT = 4, 3  # the resumed run is checkpointed after step CUT of STEPS
TRAIN = {"steps": STEPS, "batch_size": 8, "log_every": 1, "log_with": "none", "checkpoint_every": 100,
         "num_threads": 1, "optim": {"lr": 1e-3}, "ema": {"decay": 0.9}}

# one tiny config per method of registry.METHODS (test_every_method_has_a_tiny_config keeps this complete)
TINY = {
    "dmd": {"method": {"name": "dmd", "timesteps": [999, 499], "student_every": 2, "gan": {"hidden": 8},
                       "loss_weights": {"gan_g": 0.01, "gan_d": 0.01}},
            "model": TEACHER, "data": {"name": "toy2d", "conditional": True}},
    "msd": {"method": {"name": "msd", "num_students": 2, "student_every": 1, "gan": {"hidden": 8},
                       "regression": {"num_pairs": 16, "teacher_steps": 2},
                       "loss_weights": {"gan_g": 0.01, "gan_d": 0.01, "reg": 0.25}},
            "model": TEACHER, "data": {"name": "toy2d", "conditional": True}},
    "phased_dmd": {"method": {"name": "phased_dmd", "boundaries": [999, 499], "phase_steps": [2, 2],
                              "student_every": 1, "init": "previous", "gan": {"hidden": 8},
                              "loss_weights": {"gan_g": 0.01, "gan_d": 0.01}},
                   "model": TEACHER, "data": {"name": "toy2d", "conditional": True}},
    "tscd": {"method": {"name": "tscd", "teacher_steps": 10, "x0_source": "student", "guidance_max": 2.0,
                        "stages": [{"segments": 2, "steps": 2}, {"segments": 1, "steps": 2}]},
             "model": TEACHER, "data": {"name": "toy2d", "conditional": True}},
    "denoising": {"method": {"name": "denoising", "cond_dropout": 0.2},
                  "model": {"arch": {"dim": 2, "hidden": 16, "depth": 1}, "kind": "mlp", "prediction_type": "epsilon"},
                  "data": {"name": "toy2d", "conditional": True}},
}
METHODS = sorted(registry.METHODS)


def tiny_config(name: str):
    raw = json.loads(json.dumps(TINY[name]))
    return validate({**raw, "train": TRAIN})


def fit(name: str, run_dir: Path, **kw) -> Trainer:
    cfg = tiny_config(name)
    t = Trainer(cfg, registry.method_class(name), run_dir, show_progress=False, **kw)
    t.fit()
    return t


def trained_state(t: Trainer) -> dict[str, torch.Tensor]:
    """Every trained parameter, the EMA shadows and the method's own checkpointed tensors (e.g. TSCD's target)."""
    state = {f"{net}/{n}": p.detach().clone() for net, named in t.params.items() for n, p in named}
    state.update({f"ema/{net}/{i}": p.clone() for net, ema in t.emas.items() for i, p in enumerate(ema.shadow_params)})
    state.update({f"extra/{k}": v.detach().clone() for k, v in t.method.extra_state()[0].items()})
    return state


def test_every_method_has_a_tiny_config():
    assert set(TINY) == set(registry.METHODS), "add a tiny config to TINY for each method in registry.METHODS"


@pytest.mark.parametrize("name", METHODS)
def test_one_step_gives_finite_losses(tmp_path, name):
    t = fit(name, tmp_path / "run", max_steps=1)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    losses = {k: v for k, v in rows[0].items() if "/" in k and "/log/" not in k}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), rows[0]
    assert set(t.method.loss_weights(0)) >= {k.split("/", 1)[1] for k in losses}


@pytest.mark.parametrize("name", METHODS)
def test_resume_equals_an_uninterrupted_run(tmp_path, name):
    full = trained_state(fit(name, tmp_path / "full"))
    fit(name, tmp_path / "cut", max_steps=CUT)
    assert latest_checkpoint(tmp_path / "cut").name == f"step-{CUT:07d}"
    resumed = fit(name, tmp_path / "cut", resume=True)
    assert resumed.step == STEPS
    again = trained_state(resumed)
    assert full.keys() == again.keys()
    different = [k for k in full if not torch.equal(full[k], again[k])]
    assert not different, different
    rows = lambda run: [{k: v for k, v in json.loads(x).items() if k not in ("wall_s", "cpu_s", "it_per_s")}  # noqa: E731
                        for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rows("full") == rows("cut")


@pytest.mark.parametrize("name", METHODS)
def test_export_then_load_student_samples_the_same(tmp_path, name):
    """The exported artifact, opened with ``stepdistill.pipelines.load_student``, samples what the trained
    method's own networks sample, with every recipe file it wrote (same conditions, same seeds)."""
    from stepdistill.pipelines import load_student
    from stepdistill.pipelines.loading import bundle_sampler
    from stepdistill.pipelines.plan import TEACHER as BASE, SamplingRecipe
    from stepdistill.pipelines.samplers import Conditions

    raw = json.loads(json.dumps(TINY[name]))
    cfg = validate({**raw, "train": {**TRAIN, "ema": {"decay": None}}})  # the export holds the live weights
    t = Trainer(cfg, registry.method_class(name), tmp_path / "run", show_progress=False)
    out = t.fit()
    m = t.method
    own = bundle_sampler(m.bundle, {BASE: m.bundle.teacher, **{k: v.denoiser for k, v in m.student_networks().items()}},
                         main=next(iter(m.student_networks())))
    loaded = load_student(out)
    conds, seeds = Conditions(labels=torch.tensor([0, 3, 5, 7])), [1, 2, 3, 4]
    files = sorted(p.name for p in out.glob("*.json") if p.name != "config.json")
    assert "sampling.json" in files
    for file in files:
        recipe = SamplingRecipe.load(out / file)
        assert recipe.networks is not None and recipe.method == name
        x = loaded.sampler(recipe, conds, seeds)
        assert torch.allclose(x, own(recipe, conds, seeds), atol=1e-5), file
    from stepdistill.models import load_bundle

    torch.manual_seed(123)  # not vacuous: another network samples other points
    fresh = load_bundle(cfg.model, cfg.data)
    net = fresh.denoiser(fresh.new_network())
    untrained = bundle_sampler(fresh, {k: net for k in m.student_networks()}, main=next(iter(m.student_networks())))
    assert (untrained(loaded.recipe, conds, seeds) - loaded(labels=conds.labels, seeds=seeds)).abs().max() > 1e-6
