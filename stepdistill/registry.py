"""Training methods by ``method.name``: "module:Class" strings, imported on first use. Each Method class
names the schema of its config section (``Method.config``), so this table is the one place a method is
registered. ``METHODS`` is what users pick from (``stepdistill train`` / ``pretrain``); the methods that
only build shipped weights are registered in the assets package's own table (``TABLES``), which resolves
but is not listed."""

from __future__ import annotations

import difflib
import importlib

from .errors import UsageError

METHODS: dict[str, str] = {
    "dmd": "stepdistill.trainers.dmd:DMDMethod",
    "phased_dmd": "stepdistill.trainers.phased_dmd:PhasedDMDMethod",
    "msd": "stepdistill.trainers.msd:MSDMethod",
    "tscd": "stepdistill.trainers.tscd:TSCDMethod",
    "denoising": "stepdistill.trainers.denoising:DenoisingMethod",
}
TABLES: tuple[str, ...] = ("stepdistill.assets.trainers:METHODS",)  # further tables ("module:DICT"), unlisted


def names() -> list[str]:
    """The methods users choose from."""
    return list(METHODS)


def _all_methods() -> dict[str, str]:
    table = dict(METHODS)
    for ref in TABLES:
        module, _, attr = ref.partition(":")
        table.update(getattr(importlib.import_module(module), attr))
    return table


def method_class(name: str) -> type:
    """The :class:`~stepdistill.training.Method` class registered for a config's ``method.name``; UsageError
    naming the closest one. (This module imports neither ``config`` nor ``training``: ``config`` calls it.)"""
    table = _all_methods()
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown method {name!r}; {hint}methods: {', '.join(names())}")
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def config_class(name: str) -> type:
    """The schema (a ``config.MethodConfig`` subclass) of the ``method`` section of a config whose
    ``method.name`` is ``name``."""
    return method_class(name).config
