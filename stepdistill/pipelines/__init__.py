"""Samplers: one loop over stock Diffusers schedulers for every Denoiser, and Diffusers pipelines."""

from .sampling import make_scheduler, sample, seeded_generators

__all__ = ["make_scheduler", "sample", "seeded_generators"]
