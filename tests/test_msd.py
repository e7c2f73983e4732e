"""Multi-student distillation: the partition (balanced, deterministic, total, stored in the plan), training isolation
(each student sees only its part; a student's phase changes only that student), the TSM pre-stage of smaller
students, and routed sampling through a stock StableDiffusionPipeline."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill.config import validate
from stepdistill.errors import UsageError
from stepdistill.partition import balanced_split, label_parts, prompt_parts, route_by_anchors
from stepdistill.registry import method_class
from stepdistill.training import Trainer

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
TEACHER = {"pretrained": "toy2d", "arch": {"hidden": 16, "depth": 1}, "prediction_type": "epsilon",
           "scheduler": SCHED}
ROOT = Path(__file__).resolve().parents[1]


def toy(method=None, **train):
    m = {"name": "msd", "num_students": 4, "student_every": 1, **(method or {})}
    t = {"steps": 4, "batch_size": 16, "log_every": 1, "log_with": "none", "checkpoint_every": 100,
         "num_threads": 1, "optim": {"lr": 1e-2}, "ema": {"decay": None}, **train}
    return validate({"method": m, "model": TEACHER, "data": {"name": "toy2d", "conditional": True}, "train": t})


def fit(cfg, run_dir, **kw) -> Trainer:
    t = Trainer(cfg, method_class("msd"), run_dir, show_progress=False, **kw)
    t.fit()
    return t


# ---- the partition -----------------------------------------------------------------------------------------------
def test_label_parts_are_consecutive_balanced_and_validated():
    assert label_parts(10, 4) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    assert label_parts(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert label_parts(10, 2, {c: c % 2 for c in range(10)}) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    with pytest.raises(ValueError, match="missing classes"):
        label_parts(10, 2, {0: 0, 1: 1})
    with pytest.raises(ValueError, match="cannot split"):
        label_parts(3, 4)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_prompt_partition_is_balanced_deterministic_and_routes_training_prompts_home(k):
    g = torch.Generator().manual_seed(k)
    # clustered, unequal "embeddings": a k-means split would be unbalanced
    centres = torch.randn(5, 16, generator=g) * 4
    x = torch.cat([centres[i] + torch.randn(n, 16, generator=g) for i, n in enumerate([300, 40, 80, 20, 160])])
    part, anchors = prompt_parts(x, k, max_anchors=10_000)
    sizes = torch.bincount(part, minlength=k)
    assert (sizes - len(x) / k).abs().max() <= 0.1 * len(x) / k
    assert torch.equal(route_by_anchors(x, anchors), part)  # every training prompt routes to its own part
    again, _ = prompt_parts(x.clone(), k, max_anchors=10_000)
    assert torch.equal(part, again)
    # fewer anchors (k-means inside each part) still keeps the training prompts within +-10%
    _, few = prompt_parts(x, k, max_anchors=16)
    routed = torch.bincount(route_by_anchors(x, few), minlength=k)
    assert (routed - len(x) / k).abs().max() <= 0.1 * len(x) / k
    unseen = torch.randn(50, 16, generator=g) * 5
    assert set(route_by_anchors(unseen, anchors).tolist()) <= set(range(k))
    split = torch.bincount(balanced_split(x, k), minlength=k)
    assert int(split.max() - split.min()) <= 1  # equal parts up to rounding


def test_partition_is_stored_in_the_run_and_the_router_round_trips(tmp_path):
    from stepdistill.pipelines.plan import SamplingRecipe

    t = fit(toy(), tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert stored["by"] == "label" and stored["labels"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # 8 modes, 4 students
    recipe = SamplingRecipe.load(tmp_path / "run" / "student")
    assert recipe.router.by == "label" and [r.labels for r in recipe.router.routes] == stored["labels"]
    assert [r.segments[0].network for r in recipe.router.routes] == [f"student_{k}" for k in range(4)]
    labels = torch.arange(8)
    assert recipe.router.route(labels=labels).tolist() == t.method.route(
        type("S", (), {"labels": labels, "prompts": None})()).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(UsageError, match="belong to no student"):
        t.method.route(type("S", (), {"labels": torch.tensor([9]), "prompts": None})())


# ---- training ----------------------------------------------------------------------------------------------------
def test_each_student_trains_on_its_own_part_only(tmp_path):
    t = fit(toy(), tmp_path / "run", max_steps=1)
    m = t.method
    for k in range(4):
        b = m.batch(f"student_{k}")
        assert set(b["raw"].labels.tolist()) <= set(m.parts[k]) and len(b["raw"].labels) == 16
    mixed = m.batch("fake_score")
    assert torch.equal(mixed["parts"], torch.div(mixed["raw"].labels, 2, rounding_mode="floor"))
    # one student's phase changes that student only
    from stepdistill.training import Phase

    before = {n: [p.detach().clone() for _, p in named] for n, named in t.params.items()}
    t._run_phase(Phase("student_2", ("student_2",)), m.loss_weights(1))
    for n, named in t.params.items():
        same = all(torch.equal(a, p) for a, (_, p) in zip(before[n], named))
        assert same == (n != "student_2"), n


def test_tsm_stage_teaches_a_smaller_student_the_teacher(tmp_path):
    """Smaller students (half the hidden width) from scratch: after the TSM stage their x0-prediction is close to the
    teacher's: the x0-matching loss (over all noise levels; epsilon-prediction x0 errors are large at t near T) falls
    below 1.0 and a tenth of an untrained student's (about 12); skipping TSM fails this."""
    cfg = toy({"num_students": 2, "student_arch": {"hidden": 8}, "tsm_steps": 150, "student": {"lora": None}},
              steps=151, optim={"lr": 1e-2})
    t = fit(cfg, tmp_path / "run")
    m = t.method
    assert [r["name"] for r in json.loads((tmp_path / "run" / "stages.json").read_text())] == ["tsm", "dmd"]
    assert sum(p.numel() for p in m.students[0].module.parameters()) < \
        sum(p.numel() for p in m.bundle.init_net.parameters())

    def tsm_loss(k):
        m.ctx.generator.manual_seed(123)
        with torch.no_grad():
            return float(m.tsm_losses(m._tsm_batch(k))["tsm"].mean())

    trained = [tsm_loss(k) for k in range(2)]
    from stepdistill.trainers.msd import smaller_network

    m.students[0].denoiser.net = smaller_network(m.bundle, {"hidden": 8})  # untrained, same shape
    fresh = tsm_loss(0)
    assert max(trained) < 1.0 and trained[0] < fresh / 10, (trained, fresh)


def test_bad_msd_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="student.lora to null"):
        toy({"student_arch": {"hidden": 8}, "tsm_steps": 2, "student": {"lora": {"rank": 4}}})
    with pytest.raises(UsageError, match="tsm_steps > 0"):
        toy({"student_arch": {"hidden": 8}})
    with pytest.raises(UsageError, match="not settings of the teacher"):
        fit(toy({"student_arch": {"width": 8}, "tsm_steps": 2}), tmp_path / "a")
    with pytest.raises(UsageError, match="cannot split"):
        fit(toy({"num_students": 9}), tmp_path / "b")


# ---- routed sampling in a stock pipeline -------------------------------------------------------------------------
def test_prompt_routed_lora_students_in_stock_pipeline_equal_stepdistill_sample(tmp_path):
    from diffusers import StableDiffusionPipeline

    from stepdistill import assets
    from stepdistill.conditioners import pooled_prompt_embedding
    from stepdistill.config import load_config
    from stepdistill.pipelines.loading import load_run
    from stepdistill.pipelines.plan import SamplingRecipe
    from stepdistill.pipelines.samplers import Conditions

    cfg = load_config(ROOT / "configs/digits_sd/msd_lora.yaml",
                      ["method.num_students=2", "train.steps=2", "train.batch_size=4", "method.regression=null",
                       "method.student_every=1", "train.log_with=none", "train.optim.lr=1e-2",
                       "method.student.lora.rank=4", "method.fake_score.lora.rank=4", "train.ema.decay=null"])
    fit(cfg, tmp_path / "run")
    student = tmp_path / "run" / "student"
    recipe = SamplingRecipe.load(student)
    sizes = json.loads((tmp_path / "run" / "partition.json").read_text())["sizes"]
    assert recipe.router.by == "prompt_embedding" and sizes == [30, 30]  # 60 training prompts, balanced

    prompts = ["a handwritten digit three", "the number 7", "handwritten 0", "a drawing of the number eight"]
    seeds = [3, 4, 5, 6]
    pipe = StableDiffusionPipeline.from_pretrained(assets.path("digits-sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for name, net in recipe.networks.items():
        pipe.load_lora_weights(student / net.path, adapter_name=name)
    pipe.scheduler = recipe.scheduler_for(pipe)
    route = recipe.router.route(embeddings=pooled_prompt_embedding(pipe.tokenizer, pipe.text_encoder, prompts))
    assert len(set(route.tolist())) == 2  # both students are used
    stock = torch.empty(len(prompts), 3, *([pipe.unet.config.sample_size * pipe.vae_scale_factor] * 2))
    for r in route.unique().tolist():
        idx = (route == r).nonzero().squeeze(1).tolist()
        pipe.set_adapters(recipe.router.routes[r].segments[0].network)
        stock[idx] = pipe([prompts[i] for i in idx], generator=[torch.Generator().manual_seed(seeds[i]) for i in idx],
                          output_type="pt", **recipe.pipeline_kwargs()).images
    ours = load_run(tmp_path / "run").sampler(recipe, Conditions(prompts=prompts), seeds)  # `stepdistill sample`
    assert (stock - ours).abs().max() <= 1e-4


# ---- the real-scale recipe ---------------------------------------------------------------------------------------
def test_sd15_recipe_runs_on_tiny_pipeline(tmp_path):
    """configs/sd15/msd_lora.yaml on a tiny SD1.5-shaped pipeline (bf16, gradient checkpointing): finite losses for
    every student, a balanced prompt partition of the prompt file, and an exported router with one LoRA per
    student."""
    from stepdistill.config import load_config
    from stepdistill.pipelines.plan import SamplingRecipe
    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base")
    cfg = load_config(ROOT / "configs/sd15/msd_lora.yaml",
                      [f"model.pretrained={base}", "train.steps=2", "train.batch_size=2", "train.precision=bf16",
                       "train.log_every=1", "train.log_with=none", "method.student.lora.rank=4",
                       "method.fake_score.lora.rank=4", "method.student_every=1",
                       f"data.file={ROOT / 'configs/prompts/coco_style.txt'}"])
    fit(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(v == v and abs(v) != float("inf") for r in rows for v in r.values())
    assert {f"student_{k}/dm" for k in range(4)} <= set(rows[-1])
    assert json.loads((tmp_path / "run" / "partition.json").read_text())["sizes"] == [5, 5, 5, 5]  # 20 prompts
    recipe = SamplingRecipe.load(tmp_path / "run" / "student")
    assert recipe.router.by == "prompt_embedding" and len(recipe.router.routes) == 4
    assert sorted(recipe.networks) == [f"student_{k}" for k in range(4)] and recipe.timesteps == [999]
    assert all((tmp_path / "run" / "student" / n.path).is_dir() for n in recipe.networks.values())
