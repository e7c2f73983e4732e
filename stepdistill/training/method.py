"""The Method API: a training method is its networks, its update phases (data) and pure losses; the loop
(:mod:`.loop`) owns everything else. :class:`Context` is what a method may use from the loop."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import torch
from torch import nn

from ..config import MethodConfig, RunConfig

if TYPE_CHECKING:
    from ..denoisers import Denoiser
    from ..pipelines.plan import SamplingRecipe


@dataclass(frozen=True)
class Phase:
    """One update of a method: which networks' optimisers step, how often (every N-th step) and how many
    times in a row. DMD2's two time-scale rule is ``[Phase("fake_score", ("fake_score",)),
    Phase("student", ("student",), every=5)]``."""

    name: str
    networks: tuple[str, ...]
    every: int = 1
    repeats: int = 1
    start: int = 0  # the phase runs at steps start <= step < stop (stop None: to the end); ``every`` counts from start
    stop: int | None = None

    def runs_at(self, step: int) -> bool:
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        return (step - self.start) % self.every == 0


@dataclass
class Context:
    """What a method may use from the loop: device, autocast dtype, the run's seeded generator."""

    device: torch.device
    generator: torch.Generator  # CPU generator, checkpointed: all training randomness comes from it
    run_dir: Path | None = None
    is_main: bool = True
    num_processes: int = 1
    process_index: int = 0
    autocast_dtype: torch.dtype | None = None
    show_progress: bool = True  # progress bars of a method's own long steps (e.g. caching teacher outputs)

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=dtype).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.generator).to(self.device)


class Method(abc.ABC):
    """A training method: networks, update phases as data, pure losses. Subclasses set ``name``, ``kind`` and
    ``config`` (the schema of their ``method`` config section), and register in :mod:`stepdistill.registry`."""

    name: ClassVar[str]
    kind: ClassVar[str] = "distill"  # "distill" (stepdistill train) or "pretrain" (stepdistill pretrain)
    config: ClassVar[type[MethodConfig]]
    export_network: ClassVar[str] = "student"  # the network EMA averages by default and export writes
    # why train.distributed.strategy=fsdp cannot shard this method (None: it can; see training/distributed.py)
    fsdp_unsupported: ClassVar[str | None] = None

    def __init__(self, cfg: RunConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    @abc.abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks by name; each gets an AdamW over its parameters with requires_grad."""

    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        ...

    @abc.abstractmethod
    def batch(self, phase: str) -> Any:
        """Draw the next batch for ``phase`` (use ``self.ctx`` for randomness)."""

    @abc.abstractmethod
    def losses(self, batch: Any, phase: str) -> dict[str, torch.Tensor]:
        """Per-sample (or scalar) losses by name; names are the logging keys and the ``loss_weights`` keys.
        Keys starting with ``log/`` are logged only."""

    def trainable(self, name: str, net: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Named parameters the optimiser of network ``name`` steps (default: those with requires_grad).
        Methods whose networks share one module (LoRA adapters on a frozen base) narrow it down here."""
        return [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    def loss_weights(self, step: int) -> dict[str, float]:
        """The weight of each loss key at ``step`` (the loop asks every step). Default: ``method.loss_weights``,
        which the config already merged over its class's defaults; methods with stages scale entries here."""
        return dict(getattr(self.cfg.method, "loss_weights", {}) or {})

    def after_phase(self, phase: Phase, step: int) -> None:
        """Hook after a phase's optimiser step (EMA targets ...)."""

    def finished_networks(self, step: int) -> Iterable[str]:
        """Networks whose training ends with ``step`` (e.g. an expert at the end of its phase, which later phases
        then run frozen): the loop replaces their weights by their EMA average, so that what later steps use is
        what gets exported. Called before :meth:`after_step`."""
        return ()

    def after_step(self, step: int) -> Iterable[str]:
        """Hook after every phase of ``step`` ran (stage changes ...). Returns the networks whose weights the
        method re-set (e.g. an expert initialised from the previous one): the loop restarts their EMA from the
        new weights."""
        return ()

    def network_group(self, name: str) -> str | None:
        """The group whose ``train.optim_per_network`` entry network ``name`` also takes (several networks of one
        role, e.g. every phase's fake score); None: its own entry only."""
        return None

    def network_denoisers(self) -> dict[str, Denoiser]:
        """The Denoiser view each network runs through, by network name: where ``train.precision_per_network``
        sets the precision of its forward passes (a network without one cannot take an entry)."""
        return {}

    def frozen_networks(self) -> dict[str, nn.Module]:
        """Frozen networks that run beside the trained ones, by name: fsdp shards them with the trained networks
        and ``--dry-run`` counts them. Default: the teacher's network, when it has weights of its own."""
        teacher = getattr(getattr(self, "bundle", None), "teacher", None)
        net = getattr(teacher, "net", None)
        return {"teacher": net} if isinstance(net, nn.Module) and any(True for _ in net.parameters()) else {}

    def ema_networks(self) -> list[str]:
        """The networks EMA averages when ``train.ema.networks`` is not given."""
        return [self.export_network]

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Method state beyond the trained parameters (tensors, JSON) for checkpoints."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    # -- artifacts ----------------------------------------------------------------------------------
    def student_networks(self) -> dict[str, Any]:
        """The networks the student artifact is made of: name -> ``trainers.common.TrainableNet`` (a distillation
        method's ``{"student": self.student}``)."""
        raise NotImplementedError(f"{type(self).__name__} exports nothing; override export() or student_networks()")

    def recipe(self) -> SamplingRecipe:
        """How a stock pipeline samples the exported student (``sampling.json``)."""
        raise NotImplementedError(f"{type(self).__name__} has no sampling recipe")

    def alternative_recipes(self) -> dict[str, SamplingRecipe]:
        """Other ways to sample the same student: file name -> recipe, written beside ``sampling.json``."""
        return {}

    def export(self, out_dir: Path) -> None:
        """Write the student artifact (its networks + ``sampling.json``, ``pipelines.artifact``) into ``out_dir``."""
        from ..pipelines.artifact import export_student

        export_student(self.bundle, self.student_networks(), out_dir, self.recipe(),
                       alternatives=self.alternative_recipes())
