"""What every data source is: ``sample(n, generator)`` -> :class:`Sample` (real samples with their conditions) and
``conditions(n, generator)`` (conditions only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Sample:
    """A batch of raw conditions and, where the source has real data, the matching clean samples."""

    x0: torch.Tensor | None  # model space (latents for latent models); None for condition-only draws
    labels: torch.Tensor | None = None  # class / digit ids
    prompts: Sequence[str] | None = None


class DataSource:
    has_real: bool = True

    def sample(self, n: int, generator: torch.Generator) -> Sample:
        """Real samples with their conditions."""
        raise NotImplementedError

    def conditions(self, n: int, generator: torch.Generator) -> Sample:
        """Conditions only (x0 = None)."""
        s = self.sample(n, generator)
        return Sample(None, s.labels, s.prompts)

    def condition_set(self) -> Sample | None:
        """Every distinct training condition once (class ids 0..C-1, or the prompts with their labels where they
        name one); None for an unconditional source. What a partition of the condition space splits."""
        return None
