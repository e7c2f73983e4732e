"""Prompts: the digit prompt templates of the digits-sd benchmark, the inverse map prompt -> digit, and
:class:`PromptSource` (a text file of prompts, one a line) for data-free distillation.

A template holds ``{word}`` (``seven``) and/or ``{num}`` (``7``); the empty prompt ``""`` is the
unconditional branch, as in Stable Diffusion.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UsageError
from ..userfiles import read_lines
from .base import DataSource, Sample

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num}",
    "a photo of the digit {num}",
    "a drawing of the number {word}",
    "handwritten {num}",
    "{word}",
)
_TOKENS = re.compile(r"[a-z]+|[0-9]")


def digit_prompt(label: int, template: str = TEMPLATES[0]) -> str:
    """The prompt for digit ``label`` in ``template`` (``{word}`` / ``{num}`` placeholders)."""
    return template.format(word=DIGIT_WORDS[label], num=label)


def prompt_to_digit(prompt: str) -> int | None:
    """The digit a prompt names (a digit word or a single numeral), or None when it names none or several."""
    found = {DIGIT_WORDS.index(t) if t in DIGIT_WORDS else int(t)
             for t in _TOKENS.findall(prompt.lower()) if t in DIGIT_WORDS or t.isdigit()}
    return found.pop() if len(found) == 1 else None


def check_templates(templates: Sequence[str]) -> list[str]:
    """Templates that name the digit exactly once (so :func:`prompt_to_digit` inverts them); UsageError if not."""
    out = list(templates)
    if not out:
        raise UsageError("data.templates is empty; give at least one template with {word} or {num}")
    for t in out:
        if any(prompt_to_digit(digit_prompt(d, t)) != d for d in range(10)):
            raise UsageError(f"prompt template {t!r} must name the digit once with {{word}} or {{num}} and "
                             f"contain no other digit")
    return out


def random_prompts(labels: torch.Tensor, generator: torch.Generator, templates: Sequence[str],
                   empty_prob: float = 0.0) -> list[str]:
    """One prompt per label: a uniformly drawn template, replaced by "" with probability ``empty_prob``."""
    n = len(labels)
    which = torch.randint(0, len(templates), (n,), generator=generator).tolist()
    empty = (torch.rand(n, generator=generator) < empty_prob).tolist()
    return ["" if e else digit_prompt(int(y), templates[k]) for y, k, e in zip(labels.tolist(), which, empty)]


class PromptSource(DataSource):
    """Prompts from a text file (one a line) for data-free distillation; labels where a prompt names a digit
    (-1 elsewhere)."""

    has_real = False

    def __init__(self, cfg):
        path = Path(cfg.file).expanduser()
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path} (data.file)")
        self.prompts = read_lines(path, "prompt file (data.file)")
        if not self.prompts:
            raise UsageError(f"prompt file {path} has no prompts (data.file)")

    def sample(self, n, generator):
        return self.conditions(n, generator)

    def condition_set(self):
        prompts = list(dict.fromkeys(self.prompts))
        return Sample(None, torch.tensor([d if (d := prompt_to_digit(p)) is not None else -1 for p in prompts]),
                      prompts)

    def conditions(self, n, generator):
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in idx]
        labels = torch.tensor([d if (d := prompt_to_digit(p)) is not None else -1 for p in prompts])
        return Sample(None, labels, prompts)
