"""The sampling plan, ``RUN/student/sampling.json``: how stock Diffusers schedulers sample a student made of one
or several networks. Pure data (pydantic, JSON):

    {"scheduler": "LCMScheduler", "scheduler_kwargs": {}, "timesteps": [999, 749, 499, 249],
     "guidance_scale": 1.0, "eta": null, "base": "asset:digits-sd", "prediction_type": "epsilon",
     "networks": {"expert_0": {"format": "lora", "path": "expert_0"}, ...},
     "segments": [{"network": "expert_0", "timesteps": [999, 749]}, {"network": "expert_1", "timesteps": [499, 249]}],
     "router": null}

- **segments**: which network runs which timesteps, in order. A segment whose first timestep is below the previous
  segment's last one *continues* that trajectory (the latent is handed over, converted between the schedulers'
  latent spaces); otherwise the previous segment samples to its clean end and the next one re-noises that to its
  first timestep with fresh noise. ``network`` is a name in ``networks``, ``"teacher"`` (the base model: every
  adapter off), or null (the sampler's main network). No segments: one segment of the main network on the
  recipe's timesteps (or its scheduler's grid for ``num_inference_steps``) -- every recipe written before plans
  existed reads that way.
- **router**: per sample, which route (a list of segments of its own) a condition belongs to: class-id sets, or
  the nearest centre of the pooled prompt embedding. Routed sub-batches are reassembled in input order.

Trainers write it (``pipelines.artifact.export_student``); ``stepdistill sample`` / ``eval`` and
:func:`~stepdistill.pipelines.loading.load_student` read it; the evaluator uses the same class for teacher
configurations (DDIM at N steps ...). Extra keys a trainer adds are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UsageError
from ..userfiles import read_text

RECIPE_FILE = "sampling.json"
TEACHER = "teacher"  # segment network name of the base model (adapters off)
MODES = ("replace", "add")


class Segment(BaseModel):
    """One network over consecutive timesteps; scheduler / guidance default to the recipe's."""

    model_config = ConfigDict(extra="forbid")

    network: str | None = Field(None, description="a name in `networks`, 'teacher', or null: the main network")
    timesteps: list[int] | None = Field(None, description="null only in a one-segment plan (the scheduler's grid)")
    scheduler: str | None = None
    scheduler_kwargs: dict[str, Any] | None = None
    guidance_scale: float | None = Field(None, description="null: the recipe's")

    @model_validator(mode="after")
    def _decreasing(self):
        ts = self.timesteps
        if ts is not None and (not ts or any(a <= b for a, b in zip(ts, ts[1:])) or min(ts) < 0):
            raise ValueError(f"segment timesteps must be a non-empty strictly decreasing list >= 0, got {ts}")
        return self


class Route(BaseModel):
    """The conditions one student owns and how it samples them."""

    model_config = ConfigDict(extra="forbid")

    labels: list[int] | None = Field(None, description="class / digit ids of this route (router.by = label)")
    centre: list[float] | None = Field(None, description="pooled prompt embedding centre (router.by = "
                                                         "prompt_embedding; nearest centre wins)")
    anchors: list[list[float]] | None = Field(None, description="several pooled prompt embeddings standing for "
                                                                "this route (instead of one centre): the route "
                                                                "of the nearest anchor wins")
    segments: list[Segment] = Field(..., min_length=1)

    def points(self) -> list[list[float]]:
        """The embeddings this route is nearest to: its anchors, or its centre."""
        return list(self.anchors) if self.anchors else [self.centre]


class Router(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: Literal["label", "prompt_embedding"]
    routes: list[Route] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _complete(self):
        if self.by == "label":
            owned = [l for r in self.routes for l in (r.labels or [])]
            if any(r.labels is None for r in self.routes) or len(owned) != len(set(owned)):
                raise ValueError("router.by=label: every route needs labels, and no label may be in two routes")
        elif any(r.centre is None and not r.anchors for r in self.routes) or \
                len({len(p) for r in self.routes if r.centre or r.anchors for p in r.points()}) != 1:
            raise ValueError("router.by=prompt_embedding: every route needs a centre (or anchors) of one common "
                             "length")
        return self

    def route(self, labels=None, embeddings=None):
        """(B,) route index per sample from class ids (B,) or pooled prompt embeddings (B, D)."""
        import torch

        if self.by == "label":
            if labels is None:
                raise UsageError("this student routes by class id; give labels")
            table = {l: i for i, r in enumerate(self.routes) for l in r.labels}
            missing = sorted({int(l) for l in labels.tolist()} - set(table))
            if missing:
                raise UsageError(f"no student owns class id(s) {missing}; the router knows {sorted(table)}")
            return torch.tensor([table[int(l)] for l in labels.tolist()], dtype=torch.long)
        if embeddings is None:
            raise UsageError("this student routes by prompt; give prompts")
        points = [(i, p) for i, r in enumerate(self.routes) for p in r.points()]
        owner = torch.tensor([i for i, _ in points], dtype=torch.long)
        centres = torch.tensor([p for _, p in points], dtype=torch.float64)
        return owner[torch.cdist(embeddings.double().cpu(), centres).argmin(dim=1)]


class NetworkEntry(BaseModel):
    """Where one network of the artifact lives (relative to the student folder) and in which format."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: str | None = Field(None, description="lora | peft_lora | unet | pipeline | mlp; null: told by the files")
    path: str = "."
    prediction_type: str | None = None


class SamplingRecipe(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    scheduler: str = Field("DDIMScheduler", description="stock Diffusers scheduler class name")
    scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="on top of the base model's "
                                                                               "scheduler config")
    num_inference_steps: int | None = Field(None, ge=1)
    timesteps: list[int] | None = None
    guidance_scale: float | None = Field(None, description="null or <= 1: no classifier-free guidance")
    eta: float | None = None
    format: str | None = Field(None, description="lora | peft_lora | unet | pipeline | mlp (one-network students)")
    base: str | None = Field(None, description="the teacher the student was distilled from (model.pretrained)")
    prediction_type: str | None = None
    method: str | None = None
    networks: dict[str, NetworkEntry] | None = Field(None, description="null: one network, 'student', in this "
                                                                      "folder (format above)")
    segments: list[Segment] | None = None
    router: Router | None = None

    @model_validator(mode="after")
    def _has_steps(self):
        if self.num_inference_steps is None and not self.timesteps and not self.segments and self.router is None:
            raise ValueError("set num_inference_steps or timesteps")
        ts = self.timesteps
        if ts and (any(a <= b for a, b in zip(ts, ts[1:])) or min(ts) < 0):
            raise ValueError(f"timesteps must be a strictly decreasing list >= 0, got {ts}")
        for segs in self.all_segments():
            if len(segs) > 1 and any(s.timesteps is None for s in segs):
                raise ValueError("every segment of a multi-segment plan needs its timesteps")
            names = {s.network for s in segs} - {None, TEACHER}
            if self.networks is not None and names - set(self.networks):
                raise ValueError(f"segments name networks {sorted(names - set(self.networks))} that `networks` "
                                 f"does not list ({sorted(self.networks)})")
        return self

    # ---- the plan ---------------------------------------------------------------------------------------
    def plan_segments(self) -> list[Segment]:
        """The segments of an unrouted plan (one segment of the main network when none are given)."""
        if self.segments:
            return list(self.segments)
        return [Segment(network=None, timesteps=list(self.timesteps) if self.timesteps else None)]

    def all_segments(self) -> list[list[Segment]]:
        if self.router is not None:
            return [r.segments for r in self.router.routes]
        return [self.plan_segments()]

    def network_table(self) -> dict[str, NetworkEntry]:
        """The artifact's networks; a one-network recipe (no ``networks``) is ``student`` in the folder itself."""
        if self.networks:
            return dict(self.networks)
        return {"student": NetworkEntry(format=self.format, path=".", prediction_type=self.prediction_type)}

    @property
    def steps(self) -> int:
        """Network evaluations per image without guidance (the longest route)."""
        counts = [sum(len(s.timesteps) if s.timesteps else int(self.num_inference_steps or 0) for s in segs)
                  for segs in self.all_segments()]
        return max(counts)

    def label(self) -> str:
        segs = self.segments or []
        if len(segs) == 2 and segs[0].network == TEACHER:  # plan_hybrid's plan
            base, rest = segs
            student = self.model_copy(update={"segments": None})  # the student's own recipe (its timesteps)
            mode = "add" if base.timesteps[0] == rest.timesteps[0] else "replace"
            sched = f" {base.scheduler.removesuffix('Scheduler')}" if base.scheduler else ""
            w = "" if (base.guidance_scale or 1.0) <= 1.0 else f" w={base.guidance_scale:g}"
            return f"hybrid {mode} base-{len(base.timesteps)}{sched}{w} + {student.label()}"
        name = self.scheduler.removesuffix("Scheduler")
        w = "" if self.guidance_scale in (None, 1.0) else f" w={self.guidance_scale:g}"
        parts = f" {len(self.router.routes)} routes" if self.router else f" {len(segs)} segments" if segs else ""
        return f"{name}-{self.steps}{w}{parts}"

    def check_timesteps(self, num_train_timesteps: int) -> None:
        """UsageError unless every timestep of the plan lies in the schedule's [0, num_train_timesteps)."""
        T = int(num_train_timesteps)
        listed = [t for t in self.timesteps or []] + [t for segs in self.all_segments() for s in segs
                                                       for t in s.timesteps or []]
        outside = sorted({t for t in listed if not 0 <= t < T})
        if outside:
            raise UsageError(f"the plan's timesteps {outside} lie outside the schedule's [0, {T}); fix the "
                             f"recipe's timesteps")

    def with_steps(self, num_inference_steps: int) -> "SamplingRecipe":
        """The same one-segment recipe at another step count (students sampled at any count, e.g. TSCD)."""
        if self.segments or self.router is not None:
            raise UsageError("a multi-segment or routed plan fixes its timesteps; it cannot take another step count")
        return self.model_copy(update={"num_inference_steps": num_inference_steps, "timesteps": None})

    # ---- stock pipelines --------------------------------------------------------------------------------
    def scheduler_for(self, pipe_or_config, segment: Segment | None = None):
        """The recipe's stock scheduler (or a segment's) built from a pipeline's scheduler config, with the
        recipe's kwargs and the student's prediction type: ``pipe.scheduler = recipe.scheduler_for(pipe)``."""
        from .sampling import make_scheduler

        config = getattr(getattr(pipe_or_config, "scheduler", None), "config", pipe_or_config)
        name = (segment.scheduler if segment is not None and segment.scheduler else self.scheduler)
        kwargs = segment.scheduler_kwargs if segment is not None and segment.scheduler_kwargs is not None \
            else self.scheduler_kwargs
        extra = {"prediction_type": self.prediction_type} if self.prediction_type else {}
        return make_scheduler(name, {**dict(config), **extra}, **kwargs)

    def resolved_timesteps(self, pipe_or_config) -> list[int]:
        """A one-segment recipe's timesteps: its own, or its scheduler's grid for ``num_inference_steps``."""
        if self.timesteps:
            return [int(t) for t in self.timesteps]
        sched = self.scheduler_for(pipe_or_config)
        sched.set_timesteps(self.num_inference_steps)
        return [int(t) for t in sched.timesteps]

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a stock pipeline call of a one-segment recipe, or of an unrouted segment plan on one
        scheduler (its chained timesteps; the caller's ``callback_on_step_end`` switches networks)."""
        kw: dict[str, Any] = {"guidance_scale": 1.0 if self.guidance_scale is None else self.guidance_scale}
        chained = [t for seg in self.segments or [] for t in (seg.timesteps or [])]
        if self.timesteps or chained:
            kw["timesteps"] = list(self.timesteps or chained)
        else:
            kw["num_inference_steps"] = self.num_inference_steps
        if self.eta is not None:
            kw["eta"] = self.eta
        return kw

    # ---- files ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "SamplingRecipe":
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise UsageError(f"sampling recipe not found: {path} (run 'stepdistill train' to completion first)")
        try:
            return cls.model_validate(json.loads(read_text(path, "sampling recipe (JSON)")))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise UsageError(f"{path}: {'.'.join(map(str, err['loc'])) or 'recipe'}: {err['msg']}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / RECIPE_FILE
        path.write_text(json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2) + "\n")
        return path


# ---- passes: how a plan runs on schedulers (pure) --------------------------------------------------------
@dataclass(frozen=True)
class Pass:
    """One scheduler run of a plan: the scheduler is set to ``chain`` (or ``num_inference_steps``) and steps
    indices ``start .. stop - 1``; ``networks[i - start]`` runs step i. ``entry``: 'noise' (the first pass, from
    pure noise), 'continue' (the previous pass's latent at ``chain[start]``) or 'renoise' (the previous pass's
    clean output re-noised to ``chain[0]``)."""

    scheduler: str
    scheduler_kwargs: dict
    guidance_scale: float | None
    chain: tuple[int, ...] | None
    num_inference_steps: int | None
    start: int
    stop: int | None  # None: to the end of the chain
    networks: tuple[str | None, ...]  # per step; None: to the end of a grid-defined (num_inference_steps) pass
    entry: str


def passes(recipe: SamplingRecipe, segments: Sequence[Segment],
           owner: Callable[[str | None], Any] | None = None) -> list[Pass]:
    """Split ``segments`` into scheduler passes: consecutive segments that continue one trajectory share a
    chain of timesteps; within a chain, a new pass starts where the scheduler or guidance changes, or where
    ``owner(network)`` does (the pipeline a network lives in)."""
    segs = list(segments)
    if len(segs) == 1 and segs[0].timesteps is None:
        s = segs[0]
        return [Pass(s.scheduler or recipe.scheduler, dict(_kwargs(recipe, s)), _guidance(recipe, s), None,
                     recipe.num_inference_steps, 0, None, (s.network,), "noise")]
    chains: list[list[Segment]] = []
    for s in segs:
        if chains and s.timesteps[0] < chains[-1][-1].timesteps[-1]:
            chains[-1].append(s)
        else:
            chains.append([s])
    out: list[Pass] = []
    for c, chain in enumerate(chains):
        ts = tuple(t for s in chain for t in s.timesteps)
        index = 0
        for s in chain:
            key = (s.scheduler or recipe.scheduler, _kwargs(recipe, s), _guidance(recipe, s))
            n = len(s.timesteps)
            prev = out[-1] if out and index > 0 else None
            same_owner = owner is None or prev is None or owner(prev.networks[-1]) == owner(s.network)
            if prev is not None and same_owner and (prev.scheduler, prev.scheduler_kwargs, prev.guidance_scale) == key:
                out[-1] = Pass(*key, ts, None, prev.start, index + n, prev.networks + (s.network,) * n, prev.entry)
            else:
                entry = "continue" if index > 0 else ("noise" if c == 0 else "renoise")
                out.append(Pass(*key, ts, None, index, index + n, (s.network,) * n, entry))
            index += n
    return out


def _kwargs(recipe: SamplingRecipe, s: Segment) -> dict:
    return s.scheduler_kwargs if s.scheduler_kwargs is not None else recipe.scheduler_kwargs


def _guidance(recipe: SamplingRecipe, s: Segment) -> float | None:
    """The segment's CFG scale; None for no guidance (Diffusers' rule: a scale <= 1 is none)."""
    g = s.guidance_scale if s.guidance_scale is not None else recipe.guidance_scale
    return None if g is None or g <= 1.0 else g


# ---- constructors --------------------------------------------------------------------------------------
def plan_hybrid(recipe: SamplingRecipe, timesteps: Sequence[int], base_steps: int = 1, mode: str = "replace",
                base_scheduler: tuple[str, dict] | None = None, base_guidance: float | None = None
                ) -> SamplingRecipe:
    """Hybrid sampling (Gandikota & Bau 2025, Sec. 5) as a two-segment plan over the student recipe's
    ``timesteps`` [t_0 .. t_{k-1}]: the teacher runs the first ``base_steps`` of them and hands its latent at t_b
    to the student (``replace``, same NFE), or samples [t_0 .. t_{b-1}] to its clean estimate, which is
    re-noised to t_0 for the student's whole recipe (``add``, +b NFE). ``base_scheduler``: (name, kwargs) of the
    teacher's scheduler (default the recipe's); ``base_guidance``: its CFG scale (default none)."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])) or not ts:
        raise UsageError(f"hybrid timesteps must be a non-empty strictly decreasing list, got {ts}")
    if mode not in MODES:
        raise UsageError(f"hybrid mode must be one of {', '.join(MODES)}, got {mode!r}")
    if recipe.segments or recipe.router is not None:
        raise UsageError("hybrid sampling puts the teacher in front of a one-segment student plan; this student "
                         "already has a multi-segment or routed plan")
    if mode == "replace":
        if not 1 <= base_steps < len(ts):
            raise UsageError(f"--hybrid-base-steps {base_steps}: mode 'replace' needs 1 <= base steps < {len(ts)} "
                             f"(the recipe's {len(ts)} steps, at least one left to the distilled model); use "
                             f"mode 'add' for a {len(ts)}-step recipe with a base step in front")
        base_ts, student_ts = ts[:base_steps], ts[base_steps:]
    else:
        if not 1 <= base_steps <= len(ts):
            raise UsageError(f"--hybrid-base-steps {base_steps}: mode 'add' needs 1 <= base steps <= {len(ts)}")
        base_ts, student_ts = ts[:base_steps], ts
    name, kwargs = base_scheduler if base_scheduler is not None else (None, None)
    base = Segment(network=TEACHER, timesteps=base_ts, scheduler=name, scheduler_kwargs=kwargs,
                   guidance_scale=1.0 if base_guidance is None else base_guidance)
    return recipe.model_copy(update={"segments": [base, Segment(network=None, timesteps=student_ts)],
                                     "timesteps": ts, "num_inference_steps": None})
