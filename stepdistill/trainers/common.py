"""Pieces every distillation method shares: trainable copies of the teacher (full or LoRA, optionally on
one shared frozen base), drawing conditions, and the teacher's deterministic-sampler pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..denoisers import Cond, Denoiser
from ..lora import add_lora, lora_parameters
from ..models import ModelBundle


@dataclass
class TrainableNet:
    """A trainable Denoiser view and the parameters its optimiser owns."""

    name: str
    denoiser: Denoiser
    module: nn.Module  # what the trainer registers (a shared base is registered once per adapter)
    adapter: str | None

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self.adapter is None:
            return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        wanted = {id(p) for p in lora_parameters(self.module, self.adapter)}
        return [(n, p) for n, p in self.module.named_parameters() if id(p) in wanted]

    def weights(self) -> dict[str, nn.Parameter]:
        """Every weight this network owns, trainable or not, keyed without the adapter name, so that a LoRA
        adapter and its twin on the same base (or a full network and its copy) pair up key for key."""
        if self.adapter is None:
            return dict(self.module.named_parameters())
        tag = f".{self.adapter}."
        return {n.replace(tag, "."): p for n, p in self.module.named_parameters() if tag in n and "lora_" in n}


def make_trainable(bundle: ModelBundle, name: str, lora_cfg, shared_base: nn.Module | None = None) -> TrainableNet:
    """Initialise a network from the bundle's init network: a full trainable copy, or a LoRA adapter ``name``
    on ``shared_base`` (or on a private frozen copy when no shared base is given)."""
    if lora_cfg is None:
        net = bundle.new_network(trainable=True)
        return TrainableNet(name, bundle.denoiser(net), net, None)
    base = shared_base if shared_base is not None else bundle.new_network(trainable=False)
    add_lora(base, name, lora_cfg.rank, lora_cfg.alpha, lora_cfg.target_modules)
    return TrainableNet(name, bundle.denoiser(base, adapter=name), base, name)


def make_target(bundle: ModelBundle, online: TrainableNet, lora_cfg, name: str = "target") -> TrainableNet:
    """A frozen twin of ``online`` that follows it by EMA (the target network of consistency distillation,
    Song et al. 2023): a second LoRA adapter on the same frozen base, or a full frozen copy; starts equal."""
    target = make_trainable(bundle, name, lora_cfg, shared_base=online.module if online.adapter else None)
    for p in target.weights().values():
        p.requires_grad_(False)
    ema_update(target, online, 0.0)
    return target


@torch.no_grad()
def ema_update(target: TrainableNet, online: TrainableNet, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, weight by weight (decay 0 copies)."""
    tw, ow = target.weights(), online.weights()
    if tw.keys() != ow.keys():
        raise RuntimeError(f"{target.name!r} and {online.name!r} do not have the same weights")
    for key, p in tw.items():
        src = ow[key].detach().to(p.dtype)
        p.copy_(src) if decay == 0 else p.lerp_(src, 1.0 - decay)


def teacher_view(bundle: ModelBundle, shared_base: nn.Module | None) -> Denoiser:
    """The real score: the bundle's teacher, with every adapter off when its network carries adapters."""
    if shared_base is not None and bundle.teacher.net is shared_base:
        return bundle.teacher.view(adapters_off=True)
    return bundle.teacher


def draw_conditions(bundle: ModelBundle, data, n: int, generator: torch.Generator) -> Cond:
    s = data.conditions(n, generator)
    return bundle.conditioner.encode(s.labels, s.prompts)


# ---- regression pairs (DMD1, Sec. 3.3) -------------------------------------------------------------------
@dataclass
class RegressionPairs:
    """Noise z and the teacher's deterministic DDIM output for it, with the conditions used."""

    z: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor | None
    prompts: list[str] | None
    key: dict | None = None  # what the pairs were made from (teacher, steps, guidance, seed, ...): a stale cache misses

    def __len__(self) -> int:
        return len(self.z)

    @classmethod
    def build(cls, bundle: ModelBundle, teacher: Denoiser, data, num: int, steps: int, guidance: float,
              seed: int, batch: int = 250, progress: bool = True) -> "RegressionPairs":
        from tqdm.auto import tqdm

        from ..pipelines import make_scheduler, sample, seeded_generators

        g = torch.Generator().manual_seed(seed)
        conds = data.conditions(num, g)
        device = next(iter(teacher.net.parameters()), torch.zeros(0)).device
        zs, ys = [], []
        for i in tqdm(range(0, num, batch), desc="regression pairs (teacher DDIM)", leave=False, disable=not progress):
            n = min(batch, num - i)
            gens = seeded_generators(seed, n, start=i)
            z = torch.stack([torch.randn(bundle.sample_shape, generator=gg) for gg in gens]).to(device)
            labels = conds.labels[i:i + n] if conds.labels is not None else None
            prompts = list(conds.prompts[i:i + n]) if conds.prompts is not None else None
            cond = bundle.conditioner.encode(labels, prompts)
            sched = make_scheduler("DDIMScheduler", bundle.scheduler_config, prediction_type=teacher.prediction_type)
            y = sample(teacher, sched, z.shape, cond, num_inference_steps=steps, guidance=guidance, latents=z,
                       device=device)
            zs.append(z.cpu())
            ys.append(y.cpu())
        return cls(torch.cat(zs), torch.cat(ys), conds.labels, list(conds.prompts) if conds.prompts else None)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"z": self.z.contiguous(), "y": self.y.contiguous()}
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"prompts": json.dumps(self.prompts), "key": json.dumps(self.key)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "RegressionPairs":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            prompts = json.loads(meta.get("prompts", "null"))
            key = json.loads(meta.get("key", "null"))
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(t["z"], t["y"], t.get("labels"), prompts, key)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                  list[str] | None]:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        labels = self.labels[idx] if self.labels is not None else None
        prompts = [self.prompts[i] for i in idx.tolist()] if self.prompts is not None else None
        return self.z[idx], self.y[idx], labels, prompts
