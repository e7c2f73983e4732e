"""stepdistill: distil many-step diffusion models into fast 1-to-8-step students (DMD/DMD2, TSCD, ...)
that load into stock Diffusers pipelines."""

__version__ = "0.1.0"
