"""Samplers: one loop over stock Diffusers schedulers for every Denoiser, and Diffusers pipelines."""

from .hybrid import HybridPipeline, hybrid_sample, plan_hybrid
from .sampling import make_scheduler, sample, seeded_generators

__all__ = ["HybridPipeline", "hybrid_sample", "make_scheduler", "plan_hybrid", "sample", "seeded_generators"]
