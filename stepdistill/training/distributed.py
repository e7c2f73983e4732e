"""Training with several processes. ``accelerate launch`` or ``torchrun`` start them; accelerate's
``Accelerator`` sets up the process group, each process's device and autocast; this module shares the work in
one of two ways (``train.distributed.strategy``):

**ddp** -- every process holds every network, and the gradients of the networks a phase steps are averaged over
the processes while its backward pass runs. This is DDP's reducer (Li et al. 2020, "PyTorch Distributed"):
gradients in buckets of ``bucket_mb``, each bucket all-reduced asynchronously (``torch.distributed.all_reduce``)
as soon as its last gradient is accumulated, buckets issued in one fixed order so that every process runs the
same collectives, a parameter without a gradient anywhere left without one. It is applied per phase rather than
through ``DistributedDataParallel`` wrappers (``accelerator.prepare``), because:

1. methods call networks through ``Denoiser`` views -- student, fake score and teacher can be LoRA adapters on
   one frozen base (teacher = adapters off) -- never through a wrapper's forward, which is what arms DDP's
   reducer for the next backward;
2. the phases of one step train different parts of one module (the student adapter, then the fake-score
   adapter): a wrapper around the base would reduce all of its trained parameters at every backward, walking
   the graph after every forward (``find_unused_parameters``) and reducing zeros for the other adapter;
3. a phase runs a network several times (backward simulation) or lets gradients flow through a network whose
   weights are frozen for the moment (DMD2's GAN generator term), which a wrapper without
   ``find_unused_parameters`` rejects.

So :class:`GradSync` reduces exactly the parameters of the networks a phase steps, once per phase (with
gradient accumulation only in the last micro-batch's backward, as DDP's ``no_sync`` does).

**fsdp** -- FSDP2 (``torch.distributed.fsdp.fully_shard``, which accelerate's FSDP plugin applies with
``fsdp_version: 2``; called here directly because accelerate enables FSDP on GPUs only, so the same code runs on
GPUs and on CPU with gloo) shards every
trained network that is a full fine-tune -- weights, gradients, AdamW and EMA states -- and the frozen teacher,
block by block (each element of a network's top-level ``ModuleList`` s, then the rest). Gradients are
reduce-scattered during backward. Weights are gathered when a phase starts and freed when it ends: methods call
networks a different number of times on different processes (the backward-simulation step is drawn per
process), and gathering at every forward would need the same calls on every process. FSDP therefore shards the
gradients, AdamW and EMA states of trained networks (16 of their 20 bytes per parameter, plus the weights
between phases), not the weights a phase works with. LoRA networks are refused: use ddp, whose trained weights
are the small adapters; so is TSCD (``Method.fsdp_unsupported``), whose EMA target copies the student weight by
weight.

Checkpoints hold whole tensors under either strategy, in the same files as one process writes: FSDP gathers each
tensor on every process and the main process keeps it in host memory until the files are written.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def resolve_strategy(strategy: str, num_processes: int, accelerate_fsdp: bool) -> str:
    """``none`` (one process), ``ddp`` or ``fsdp``; ``auto`` is fsdp when accelerate's config selects FSDP."""
    if num_processes == 1:
        return "none"
    if strategy != "auto":
        return strategy
    return "fsdp" if accelerate_fsdp else "ddp"


def fsdp_refusal(method, nets: dict[str, nn.Module], params: dict[str, list[tuple[str, nn.Parameter]]]
                 ) -> str | None:
    """Why fsdp cannot shard this method's networks (None: it can): it shards whole networks, so every trained
    network must own its module and train all of it."""
    if method.fsdp_unsupported:
        return f"method {method.name} cannot be sharded ({method.fsdp_unsupported}); use train.distributed.strategy=ddp"
    for name, net in nets.items():
        own = {id(p) for _, p in params[name]}
        if any(id(p) not in own for p in net.parameters()):
            return (f"train.distributed.strategy=fsdp shards full fine-tunes, but network {name!r} trains a LoRA "
                    f"adapter on a frozen base; use train.distributed.strategy=ddp (the adapters are small, the "
                    f"frozen base is replicated)")
    return None


# ---- ddp: per-phase bucketed gradient averaging ---------------------------------------------------------------
@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    pending: int = 0  # gradients still to be accumulated in the running backward
    armed: bool = False
    launched: bool = False


@dataclass(eq=False)
class _Flight:
    bucket: _Bucket
    flat: torch.Tensor  # the bucket's gradients, then one "has a gradient" flag per parameter
    work: object = field(repr=False)


class GradSync:
    """Averages the gradients of a phase's networks over all processes during its backward pass (the module
    docstring says why per phase). ``params``: each network's trained parameters, in registration order."""

    def __init__(self, params: dict[str, list[nn.Parameter]], bucket_bytes: int):
        self.world = dist.get_world_size()
        self.buckets = {name: _buckets(ps, bucket_bytes) for name, ps in params.items()}
        self._bucket_of: dict[int, _Bucket] = {}
        for bucket in (b for bs in self.buckets.values() for b in bs):
            for p in bucket.params:
                if id(p) in self._bucket_of:
                    raise RuntimeError("a parameter is trained by two networks; each needs its own")
                self._bucket_of[id(p)] = bucket
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated)
                       for bs in self.buckets.values() for b in bs for p in b.params]
        self._order: list[_Bucket] = []  # buckets of the coming backward, in the order they are reduced
        self._next = 0
        self._flights: deque[_Flight] = deque()

    @torch.no_grad()
    def broadcast(self) -> None:
        """Every process starts from process 0's trained weights (as DDP does when it wraps a module)."""
        for bucket in (b for bs in self.buckets.values() for b in bs):
            flat = _flatten_dense_tensors([p.detach() for p in bucket.params])
            dist.broadcast(flat, src=0)
            for p, value in zip(bucket.params, _unflatten_dense_tensors(flat, bucket.params)):
                p.copy_(value)

    def arm(self, networks: tuple[str, ...]) -> None:
        """The next backward pass reduces the gradients of these networks."""
        self._order = [b for name in networks for b in self.buckets[name]]
        for b in self._order:
            b.pending, b.armed, b.launched = len(b.params), True, False
        self._next = 0

    def finish(self) -> None:
        """After the phase's last backward: reduce the buckets the backward pass did not (a parameter without a
        gradient on this process), wait for every reduction and write the averages into ``.grad``."""
        for bucket in self._order[self._next:]:
            self._launch(bucket)
        self._write_back(block=True)
        for b in self._order:
            b.armed = False
        self._order, self._next = [], 0

    def _accumulated(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of.get(id(p))
        if bucket is None or not bucket.armed:
            return
        if bucket.launched:
            raise RuntimeError("a gradient was accumulated after its bucket was reduced (a parameter reached twice "
                               "in one backward pass, e.g. by reentrant checkpointing); use non-reentrant checkpointing")
        bucket.pending -= 1
        while self._next < len(self._order) and self._order[self._next].pending == 0:
            self._launch(self._order[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        self._write_back(block=False)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        used = torch.tensor([float(p.grad is not None) for p in bucket.params], dtype=grads[0].dtype,
                            device=grads[0].device)
        flat = _flatten_dense_tensors(grads + [used])
        bucket.launched = True
        self._flights.append(_Flight(bucket, flat, dist.all_reduce(flat, async_op=True)))

    @torch.no_grad()
    def _write_back(self, block: bool) -> None:
        """Averaged gradients of finished reductions into ``.grad`` (all of them when ``block``)."""
        while self._flights and (block or self._flights[0].work.is_completed()):
            flight = self._flights.popleft()
            flight.work.wait()
            params, n = flight.bucket.params, len(flight.bucket.params)
            used = flight.flat[-n:].tolist()
            for p, mean, count in zip(params, _unflatten_dense_tensors(flight.flat[:-n], params), used):
                if count == 0:
                    continue  # no process has a gradient for it: it stays None, as with one process
                mean.div_(self.world)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)


def _buckets(params: list[nn.Parameter], cap_bytes: int) -> list[_Bucket]:
    """Consecutive parameters, last first (backward produces their gradients roughly in that order), in buckets
    of at most ``cap_bytes`` (a larger parameter gets a bucket of its own) with one dtype and device each."""
    out, current, size = [], [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > cap_bytes or (p.dtype, p.device) != (current[0].dtype, current[0].device)):
            out.append(_Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        out.append(_Bucket(current))
    return out


# ---- fsdp -------------------------------------------------------------------------------------------------
class Sharding:
    """FSDP2 over whole networks (the module docstring says what is sharded when)."""

    def __init__(self, modules: list[nn.Module], device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # weights stay gathered for a whole phase, so the pre-backward all-gather that FSDP warns an in-place op on
        # a returned view (the GAN head's squeeze) would skip is never needed
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self.roots = modules
        for module in modules:
            for child in module.children():
                if isinstance(child, nn.ModuleList):
                    for block in child:
                        if any(True for _ in block.parameters()):
                            fully_shard(block, mesh=mesh, reshard_after_forward=False)
            fully_shard(module, mesh=mesh, reshard_after_forward=False)
        self.fsdp_modules = [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]
        for m in self.fsdp_modules:
            m.set_reshard_after_backward(False, recurse=False)
            m.set_reduce_scatter_unused_params(True, recurse=False)

    def owns(self, module: nn.Module) -> bool:
        return any(module is root for root in self.roots)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Weights of every sharded network gathered for the length of a phase (one all-gather per block, in a
        fixed order on every process), freed afterwards."""
        for m in self.fsdp_modules:
            m.unshard()
        try:
            yield
        finally:
            for m in self.fsdp_modules:
                m.reshard()

    @contextlib.contextmanager
    def full_weights(self, modules: list[nn.Module], keep: bool) -> Iterator[None]:
        """The sharded ``modules`` hold their full weights (on the CPU) and their own class while the block runs
        -- where ``keep`` (the process that exports), the others only take part in gathering -- so that code that
        saves a network (``save_pretrained``, ``state_dict``) sees a plain one."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        classes: list[tuple[nn.Module, type]] = []
        try:
            for module in modules:
                for sub in module.modules():
                    for name, p in list(sub._parameters.items()):
                        if isinstance(p, DTensor):
                            full = p.full_tensor().detach().cpu()
                            if keep:
                                swapped.append((sub, name, p))
                                sub._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
                    if keep and isinstance(sub, FSDPModule):
                        classes.append((sub, type(sub)))
                        sub.__class__ = next(c for c in type(sub).__bases__ if c is not FSDPModule)
            yield
        finally:
            for sub, name, p in swapped:
                sub._parameters[name] = p
            for sub, cls in classes:
                sub.__class__ = cls


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (the tensor itself when it is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``template``: sharded the same way (no communication: every process holds ``full``)
    when ``template`` is sharded, else ``full`` on its device and in its dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(template, DTensor):
        return distribute_tensor(full.to(template.device, template.dtype), template.device_mesh,
                                 template.placements, src_data_rank=None)
    return full.to(template.device, template.dtype)


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
