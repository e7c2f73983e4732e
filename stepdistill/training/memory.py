"""``--dry-run``'s account of a run: the parameters of every network (trained / frozen) and an estimate of the
memory each process holds for them -- weights, gradients, AdamW and EMA states -- under ddp and fsdp
(:mod:`.distributed`), for N processes. The method is built as for training, with its networks on the meta device
from their configs (``models.meta_bundle``: no weights are read), so the counts are exact; the memory is an
estimate: activations, autocast's low-precision weight copies that backward keeps, communication buffers, the
CUDA context and allocator slack come on top. The lines are YAML comments, so the dry run's output stays a
config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .distributed import fsdp_refusal
from .method import Context, Method

@dataclass
class Row:
    name: str
    trained: int  # parameters
    frozen: int
    kind: str


@dataclass
class Account:
    """Parameters and bytes of a method's networks, split by how each strategy stores them."""

    rows: list[Row] = field(default_factory=list)
    trained_bytes: int = 0  # trained parameters (fp32 master weights: their gradients and AdamW states follow)
    ema_bytes: int = 0  # trained parameters with an EMA copy
    frozen_bytes: int = 0  # frozen weights: LoRA bases, the teacher, text encoders, VAE
    fsdp_refusal: str | None = None
    notes: list[str] = field(default_factory=list)

    def per_process(self, strategy: str, n: int) -> dict[str, float]:
        """Bytes per process: weights while a phase runs (fsdp gathers them for it), gradients, AdamW, EMA."""
        shard = n if strategy == "fsdp" else 1
        out = {"weights": self.trained_bytes + self.frozen_bytes,
               "grads": self.trained_bytes / shard, "adamw": 2 * self.trained_bytes / shard,
               "ema": self.ema_bytes / shard}
        out["total"] = sum(out.values())
        return out


def account(method: Method, cfg) -> Account:
    """What ``method`` (built) trains and holds frozen."""
    acc = Account()
    nets = method.networks()
    params = {name: method.trainable(name, net) for name, net in nets.items()}
    trained = {id(p) for named in params.values() for _, p in named}
    owner: dict[int, str] = {}  # module -> the first network that uses it
    ema = set(cfg.train.ema.networks or method.ema_networks()) if cfg.train.ema.decay is not None else set()
    for name, net in nets.items():
        t = sum(p.numel() for _, p in params[name])
        tb = sum(p.numel() * p.element_size() for _, p in params[name])
        acc.trained_bytes += tb
        acc.ema_bytes += tb if name in ema else 0
        if id(net) in owner:
            acc.rows.append(Row(name, t, 0, f"LoRA on {owner[id(net)]}'s base"))
            continue
        owner[id(net)] = name
        frozen = [p for p in net.parameters() if id(p) not in trained]
        acc.frozen_bytes += sum(p.numel() * p.element_size() for p in frozen)
        kind = "full" if not frozen else "LoRA on a frozen base"
        acc.rows.append(Row(name, t, sum(p.numel() for p in frozen), kind))
    for name, net in method.frozen_networks().items():
        if id(net) in owner:
            acc.rows.append(Row(name, 0, 0, f"{owner[id(net)]}'s base with adapters off"))
            continue
        owner[id(net)] = name
        acc.frozen_bytes += sum(p.numel() * p.element_size() for p in net.parameters())
        acc.rows.append(Row(name, 0, sum(p.numel() for p in net.parameters()), "frozen"))
    bundle = getattr(method, "bundle", None)
    others = [m for m in [*getattr(bundle, "components", {}).get("text_encoders", []), getattr(bundle, "vae", None)]
              if isinstance(m, nn.Module) and id(m) not in owner]
    if others:
        count = sum(p.numel() for m in others for p in m.parameters())
        acc.frozen_bytes += sum(p.numel() * p.element_size() for m in others for p in m.parameters())
        acc.rows.append(Row("text encoders, VAE", 0, count, "frozen"))
    elif bundle is not None and bundle.kind in ("sd", "sdxl"):
        acc.notes.append("text encoders and VAE not counted: the model was built from a UNet config alone")
    acc.fsdp_refusal = fsdp_refusal(method, nets, params)
    return acc


def build_method(cfg, method_cls: type[Method], num_processes: int, unet_config: Path | None = None) -> Method:
    """The method of ``cfg`` with its networks on the meta device (on the CPU for toy models, which are tiny);
    ``unet_config`` (a UNet config.json or a folder with one) stands in for ``model.pretrained``."""
    model = cfg.model
    if unet_config is not None:
        model = model.model_copy(update={"pretrained": str(unet_config)})
    device = "cpu" if model.pretrained in (None, "toy2d") else "meta"
    ctx = Context(device=torch.device(device), generator=torch.Generator().manual_seed(cfg.train.seed),
                  num_processes=num_processes, show_progress=False)
    return method_cls(cfg.model_copy(update={"model": model}), ctx)


def describe(cfg, method_cls: type[Method], num_processes: int, source: str,
             unet_config: Path | None = None, chosen: str = "ddp") -> str:
    """The dry run's lines (YAML comments): networks, then per-process memory under ddp and fsdp."""
    try:
        method = build_method(cfg, method_cls, num_processes, unet_config)
        acc = account(method, cfg)
    except (UsageError, RuntimeError, ValueError, NotImplementedError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "" if unet_config else "; --unet-config FILE estimates from a UNet config.json alone"
        return f"# memory estimate unavailable: {reason}{hint}\n"
    built = "on the meta device from configs, no weights read" if method.ctx.device.type == "meta" else "on the CPU"
    lines = report(acc, cfg, num_processes, source, chosen, built)
    return "\n".join(f"# {line}" if line else "#" for line in lines) + "\n"


def report(acc: Account, cfg, n: int, source: str, chosen: str, built: str) -> list[str]:
    lines = ["", f"networks (parameters; built {built}):",
             f"  {'network':<20}{'trained':>10}{'frozen':>10}  kind"]
    lines += [f"  {r.name:<20}{_count(r.trained):>10}{_count(r.frozen):>10}  {r.kind}" for r in acc.rows]
    lines += [f"  ({note})" for note in acc.notes]
    precision = cfg.train.precision
    if precision == "auto":
        precision = "auto (bf16 autocast on CUDA)"
    lines += ["", f"per-process memory estimate for {n} process{'es' if n > 1 else ''} ({source}), precision "
                  f"{precision}: weights, gradients, AdamW and EMA states; trained weights are fp32 under autocast",
              f"  {'strategy':<10}{'weights':>10}{'grads':>10}{'AdamW':>10}{'EMA':>10}{'total':>10}"]
    for strategy in ("ddp", "fsdp"):
        mark = f"{strategy} *" if strategy == chosen else strategy
        if strategy == "fsdp" and acc.fsdp_refusal:
            lines.append(f"  {mark:<10}not available: {acc.fsdp_refusal}")
            continue
        m = acc.per_process(strategy, n)
        lines.append(f"  {mark:<10}" + "".join(f"{_bytes(m[k]):>10}" for k in ("weights", "grads", "adamw", "ema",
                                                                               "total")))
    lines += ["  (* train.distributed.strategy; fsdp gathers a network's weights for the length of a phase, so its "
              "weights column is the peak, and shards gradients, AdamW and EMA states)",
              "  not included: activations, autocast's low-precision weight copies kept for backward, "
              "communication buffers, the CUDA context"]
    return lines


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}B"


def _count(n: int) -> str:
    if n == 0:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)
