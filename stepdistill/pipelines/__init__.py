"""Sampling: plans (which network runs which timesteps, routers), one loop over stock Diffusers schedulers, stock
pipelines, samplers for teachers / students / plans, and the student artifact's exporter and loader."""

from .hybrid import HybridPipeline
from .loading import Student, load_run, load_student, load_teacher
from .plan import Route, Router, SamplingRecipe, Segment, plan_hybrid
from .samplers import Conditions, DenoiserSampler, PipelineSampler, Sampler
from .sampling import make_scheduler, sample, seeded_generators

__all__ = ["Conditions", "DenoiserSampler", "HybridPipeline", "PipelineSampler", "Route", "Router", "Sampler",
           "SamplingRecipe", "Segment", "Student", "load_run", "load_student", "load_teacher", "make_scheduler",
           "plan_hybrid", "sample", "seeded_generators"]
