"""Multi-Student Distillation (Song et al. 2024, "Multi-student Diffusion Distillation for Better One-step
Generators"): K one-step students, each owning one part of a partition of the condition space, trained with DMD's
terms in one run; a router (a lookup of the condition, not a network call) picks the student at sampling time, so a
sample still costs one network evaluation.

- **Partition** (``stepdistill.partition``): class ids in consecutive ranges or an explicit mapping; prompts in
  balanced parts of their pooled text embedding. It is written to ``RUN/partition.json`` and becomes the router of
  the exported ``sampling.json``.
- **Students**: LoRA adapters on the one frozen base (same size as the teacher; start from the teacher) or separate
  smaller networks (``student_arch``: overrides of the teacher network's config, e.g. fewer channels), which first
  learn the teacher by **teacher score matching** (TSM: the student's x0-prediction regressed onto the teacher's at
  every noise level, on noised real samples -- or the teacher's regression-pair outputs when the data has none --
  of its own part) for ``tsm_steps`` steps, then DMD. ``RUN/stages.json`` times the stages.
- **DMD** (interleaved): every ``student_every``-th step each student k updates on conditions of its own part
  (the distribution-matching and GAN terms see only part k); the regression term, when on, uses the full paired set
  for every student (filtering it caused mode collapse in the paper). One conditional fake score is shared: it
  learns the routed generator (each condition's samples come from the student owning it), whose conditional
  distribution at condition c is exactly student k(c)'s, so one network serves every student at one student's
  memory cost.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from .. import losses as L
from ..config import Strict
from ..data import Sample
from ..errors import UsageError
from ..generators import FewStepGenerator
from ..partition import label_parts, prompt_parts, route_by_anchors
from ..pipelines.plan import Route, Router, SamplingRecipe, Segment
from ..training import Method, Phase, StageLog
from .common import TrainableNet, make_trainable
from .dmd import DMDMethod, DMDTermsConfig
from .dmd_terms import distribution_matching_loss, gan_generator_loss, noised

STAGES_FILE = "stages.json"  # RUN/stages.json: steps and wall-clock seconds of the TSM and DMD stages
PARTITION_FILE = "partition.json"  # RUN/partition.json: what each student owns and the part sizes


class PartitionConfig(Strict):
    """How the condition space is split among the students."""

    by: Literal["auto", "label", "prompt_embedding"] = Field("auto", description="auto: prompts for text-to-image "
                                                                                 "models, class ids otherwise")
    mapping: dict[int, int] | None = Field(None, description="class id -> student (by: label); null: consecutive "
                                                             "ranges")
    max_anchors: int = Field(256, ge=1, description="router anchors per student (by: prompt_embedding)")


class MSDConfig(DMDTermsConfig):
    """Multi-student distillation: K one-step students over a partition of the condition space, and a router."""

    name: Literal["msd"] = "msd"
    timesteps: list[int] = Field([999], min_length=1, description="each student's timesteps (one entry: one step)")
    num_students: int = Field(4, ge=1, description="K")
    partition: PartitionConfig = PartitionConfig()
    student_arch: dict[str, Any] | None = Field(None, description="smaller students: overrides of the teacher "
                                                                  "network's config (e.g. {block_out_channels: "
                                                                  "[16, 32, 32]}); full networks, trained from "
                                                                  "scratch by the TSM stage")
    tsm_steps: int = Field(0, ge=0, description="steps of the teacher-score-matching stage before DMD")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {
        "dm": 1.0, "fake": 1.0, "reg": 0.25, "gan_g": 3e-3, "gan_d": 1e-2, "tsm": 1.0})

    @model_validator(mode="after")
    def _check(self):
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])) or min(self.timesteps) < 0:
            raise ValueError(f"timesteps must be strictly decreasing and >= 0, got {self.timesteps}")
        if self.student_arch is not None and self.student.lora is not None:
            raise ValueError("smaller students (student_arch) are full networks: set student.lora to null")
        if self.student_arch is not None and self.tsm_steps == 0:
            raise ValueError("smaller students start from scratch: give them a TSM stage (tsm_steps > 0)")
        return self


def smaller_network(bundle, overrides: dict[str, Any]) -> torch.nn.Module:
    """A fresh, trainable network of the teacher's class with ``overrides`` applied to its config."""
    base = bundle.init_net
    config = dict(base.config)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise UsageError(f"method.student_arch: {unknown} are not settings of the teacher's {type(base).__name__} "
                         f"(it has {sorted(k for k in config if not k.startswith('_'))})")
    config.update(overrides)
    net = type(base).from_config(config) if hasattr(type(base), "from_config") else type(base)(**config)
    return net.to(next(base.parameters()).device).requires_grad_(True)


class MSDMethod(DMDMethod):
    name = "msd"
    kind = "distill"
    config = MSDConfig
    export_network = "student_0"

    def _build_networks(self) -> None:
        mc, b, cfg = self.cfg.method, self.bundle, self.cfg
        if max(mc.timesteps) >= b.schedule.num_train_timesteps:
            raise UsageError(f"method.timesteps {mc.timesteps} exceed the teacher's "
                             f"{b.schedule.num_train_timesteps} training timesteps")
        if mc.tsm_steps >= cfg.train.steps:
            raise UsageError(f"method.tsm_steps ({mc.tsm_steps}) leaves no DMD steps of train.steps "
                             f"({cfg.train.steps})")
        self._build_partition()
        K = mc.num_students
        if mc.student_arch is not None:
            self.students = []
            for k in range(K):
                net = smaller_network(b, mc.student_arch)
                self.students.append(TrainableNet(f"student_{k}", b.denoiser(net), net, None))
        else:
            self.students = [make_trainable(b, f"student_{k}", mc.student.lora, self.shared) for k in range(K)]
        self.fake = make_trainable(b, "fake", mc.fake_score.lora, self.shared)
        for net in [*self.students, self.fake]:
            net.module.to(self.ctx.device).train()
        self.generators = [FewStepGenerator(s.denoiser, mc.timesteps) for s in self.students]
        self.generator = self.generators[0]  # the step count DMD's backward simulation draws from
        steps = [mc.tsm_steps, cfg.train.steps - mc.tsm_steps] if mc.tsm_steps else [cfg.train.steps]
        names = ["tsm", "dmd"] if mc.tsm_steps else ["dmd"]
        self.stages = StageLog(steps, STAGES_FILE, self.ctx.run_dir, self.ctx.is_main,
                               describe=lambda i: {"name": names[i]})

    # -- the partition ------------------------------------------------------------------------------
    def _build_partition(self) -> None:
        mc, K = self.cfg.method, self.cfg.method.num_students
        conds = self.data.condition_set()
        if conds is None:
            raise UsageError(f"multi-student distillation splits the condition space, but data {self.cfg.data.name!r} "
                             f"is unconditional; use a conditional data source")
        by = mc.partition.by
        if by == "auto":
            by = "prompt_embedding" if conds.prompts is not None and hasattr(self.bundle.conditioner, "pooled") \
                else "label"
        self.by = by
        self._prompt_parts: dict[str, int] = {}
        try:
            if by == "label":
                if conds.labels is None or (conds.labels < 0).any():
                    raise UsageError("partition.by=label needs class-labelled conditions; use by: prompt_embedding")
                self.parts = label_parts(int(conds.labels.max()) + 1, K, mc.partition.mapping)
                self.table = {c: j for j, part in enumerate(self.parts) for c in part}
                sizes = [len(p) for p in self.parts]
                record: dict[str, Any] = {"labels": self.parts}
            else:
                if conds.prompts is None or not hasattr(self.bundle.conditioner, "pooled"):
                    raise UsageError("partition.by=prompt_embedding needs a text-to-image model and prompts")
                emb = self.bundle.conditioner.pooled(conds.prompts)
                _, self.anchors = prompt_parts(emb, K, mc.partition.max_anchors)
                routed = route_by_anchors(emb, self.anchors)
                sizes = torch.bincount(routed, minlength=K).tolist()
                record = {"prompts": [[p for p, r in zip(conds.prompts, routed.tolist()) if r == j] for j in range(K)]}
        except ValueError as e:
            raise UsageError(f"method.partition: {e}") from None
        self.sizes = sizes
        self.partition_record = {"by": by, "num_students": K, "sizes": sizes, **record}
        if self.ctx.run_dir is not None and self.ctx.is_main:
            self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
            (self.ctx.run_dir / PARTITION_FILE).write_text(json.dumps(self.partition_record, indent=1) + "\n")

    def route(self, raw: Sample) -> torch.Tensor:
        """(B,) the student owning each condition of a batch."""
        if self.by == "label":
            unknown = sorted({int(c) for c in raw.labels.tolist()} - set(self.table))
            if unknown:
                raise UsageError(f"class id(s) {unknown} belong to no student")
            return torch.tensor([self.table[int(c)] for c in raw.labels.tolist()], dtype=torch.long)
        new = [p for p in dict.fromkeys(raw.prompts) if p not in self._prompt_parts]
        if new:
            parts = route_by_anchors(self.bundle.conditioner.pooled(new), self.anchors).tolist()
            self._prompt_parts.update(zip(new, parts))
        return torch.tensor([self._prompt_parts[p] for p in raw.prompts], dtype=torch.long)

    def _draw_part(self, k: int, n: int, real: bool = False) -> Sample:
        """n conditions (with real samples when ``real``) of student k's part, drawn from the data by rejection."""
        K, got = self.cfg.method.num_students, []
        have = 0
        while have < n:
            s = self.data.sample(n * K, self.ctx.generator) if real else self.data.conditions(n * K, self.ctx.generator)
            idx = (self.route(s) == k).nonzero().squeeze(1)[: n - have]
            got.append(Sample(None if s.x0 is None else s.x0[idx], None if s.labels is None else s.labels[idx],
                              None if s.prompts is None else [s.prompts[i] for i in idx.tolist()]))
            have += len(idx)
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return Sample(cat([g.x0 for g in got]), cat([g.labels for g in got]),
                      None if got[0].prompts is None else [p for g in got for p in g.prompts])

    # -- structure --------------------------------------------------------------------------------
    def networks(self):
        nets = {f"student_{k}": s.module for k, s in enumerate(self.students)}
        nets["fake_score"] = self.fake.module
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

    def trainable(self, name, net):
        if name.startswith("student_"):
            return self.students[int(name.rpartition("_")[2])].named_parameters()
        if name == "fake_score":
            return self.fake.named_parameters()
        return Method.trainable(self, name, net)

    def network_group(self, name):
        return "student" if name.startswith("student_") else None

    def ema_networks(self):
        return [f"student_{k}" for k in range(len(self.students))]

    def phases(self):
        mc, K, tsm = self.cfg.method, len(self.students), self.cfg.method.tsm_steps
        fake = ("fake_score", "gan_head") if self.head is not None else ("fake_score",)
        out = [Phase(f"tsm_{k}", (f"student_{k}",), stop=tsm) for k in range(K)] if tsm else []
        out += [Phase(f"student_{k}", (f"student_{k}",), every=mc.student_every, start=tsm) for k in range(K)]
        return out + [Phase("fake_score", fake, repeats=mc.fake_repeats, start=tsm)]

    def after_step(self, step):
        self.stages.step_done(step)
        return ()

    def extra_state(self):
        return {}, {**self.stages.state(), "partition_sizes": self.sizes, "partition_by": self.by}

    def load_extra_state(self, tensors, meta):
        if meta.get("partition_sizes") != self.sizes or meta.get("partition_by") != self.by:
            raise UsageError("the checkpoint was trained on another partition of the conditions; resume with the "
                             "config (and data) it was written with")
        self.stages.load_state(meta)

    # -- data ---------------------------------------------------------------------------------------
    def role(self, phase):
        return phase.rpartition("_")[0] if phase.startswith(("tsm_", "student_")) else phase

    def raw_conditions(self, phase, n):
        if phase.startswith("student_"):
            return self._draw_part(int(phase.rpartition("_")[2]), n)
        return super().raw_conditions(phase, n)

    def batch(self, phase):
        if phase.startswith("tsm_"):
            return self._tsm_batch(int(phase.rpartition("_")[2]))
        out = super().batch(phase)
        if phase.startswith("student_"):
            out["student"] = int(phase.rpartition("_")[2])
        else:
            out["parts"] = self.route(out["raw"])
        return out

    def _tsm_batch(self, k: int) -> dict:
        """Clean samples of part k: real data, or the teacher's regression-pair outputs without real data."""
        n = self.cfg.train.batch_size
        if self.data.has_real:
            s = self._draw_part(k, n, real=True)
            x0 = s.x0.to(self.ctx.device)
        elif self.pairs is not None:
            raw = Sample(None, self.pairs.labels, self.pairs.prompts)
            mine = (self.route(raw) == k).nonzero().squeeze(1)
            idx = mine[torch.randint(0, len(mine), (n,), generator=self.ctx.generator)]
            x0 = self.pairs.y[idx].to(self.ctx.device)
            s = Sample(None, None if raw.labels is None else raw.labels[idx],
                       None if raw.prompts is None else [raw.prompts[i] for i in idx.tolist()])
        else:
            raise UsageError(f"method.tsm_steps needs clean samples: data {self.cfg.data.name!r} has none; add "
                             f"method.regression (teacher samples) or use an image dataset")
        return {"x0": x0, "cond": self.bundle.conditioner.encode(s.labels, s.prompts), "student": k}

    # -- losses -------------------------------------------------------------------------------------
    def losses(self, batch, phase):
        if phase.startswith("tsm_"):
            return self.tsm_losses(batch)
        return super().losses(batch, phase)

    def tsm_losses(self, batch) -> dict[str, torch.Tensor]:
        """Teacher score matching: the student's x0-prediction at x_t (t ~ U[0, T), from a clean sample of its part)
        regressed onto the teacher's (with the real score's guidance)."""
        student, cond = self.students[batch["student"]].denoiser, batch["cond"]
        x_t, t, _ = noised(self.bundle.schedule, batch["x0"], (0, self.bundle.schedule.num_train_timesteps - 1),
                           self.ctx)
        with torch.no_grad():
            target = self.teacher.x0(x_t, t, cond, self.cfg.method.real_guidance)
        return {"tsm": L.mse(student.x0(x_t, t, cond).float(), target.float())}

    def student_losses(self, batch):
        mc, k, cond = self.cfg.method, batch["student"], batch["cond"]
        gen = self.generators[k]
        x, _ = gen(batch["z"], cond, batch["k"], self.ctx.randn_like)
        out = {"dm": distribution_matching_loss(x, cond, self.teacher, self.fake.denoiser, self.ctx, self.t_range,
                                                mc.real_guidance)}
        if self.head is not None and mc.loss_weights["gan_g"] > 0:
            out["gan_g"] = gan_generator_loss(self.fake.denoiser, self.head, x, cond, self.ctx)
        if "reg" in batch:  # the full paired set, for every student
            zr, yr, cond_r = batch["reg"]
            out["reg"] = L.mse(gen.denoise(zr, mc.timesteps[0], cond_r).float(), yr.float())
        return out

    @torch.no_grad()
    def fake_samples(self, batch) -> torch.Tensor:
        """The routed generator's samples: each from the student owning its condition."""
        z, cond, parts = batch["z"], batch["cond"], batch["parts"]
        x = torch.empty_like(z)
        for j in parts.unique().tolist():
            idx = (parts == j).nonzero().squeeze(1).to(z.device)
            xj, _ = self.generators[j](z[idx], None if cond is None else cond.index(idx), batch["k"],
                                       self.ctx.randn_like)
            x[idx] = xj.to(x.dtype)
        return x

    # -- artifacts ----------------------------------------------------------------------------------
    def student_networks(self):
        return {f"student_{k}": s for k, s in enumerate(self.students)}

    def recipe(self) -> SamplingRecipe:
        """LCMScheduler on the students' timesteps, guidance 1; a router picks each condition's student."""
        ts = list(self.cfg.method.timesteps)
        routes = []
        for k in range(len(self.students)):
            seg = [Segment(network=f"student_{k}", timesteps=ts)]
            if self.by == "label":
                routes.append(Route(labels=self.parts[k], segments=seg))
            else:
                routes.append(Route(anchors=self.anchors[k].tolist(), segments=seg))
        return SamplingRecipe(scheduler="LCMScheduler", num_inference_steps=len(ts), timesteps=ts, guidance_scale=1.0,
                              method=self.name, prediction_type=self.students[0].denoiser.prediction_type,
                              router=Router(by=self.by, routes=routes), partition_sizes=self.sizes)
