"""Checkpoint files: ``RUN/checkpoints/step-NNNNNNN/`` holds ``weights`` (trained parameters and a method's
extra tensors), ``optimizer``, ``ema`` and ``rng_rank{i}`` safetensors plus ``state.json`` (step, JSON
state). A checkpoint is written into a hidden staging folder and renamed into place, so a crash while
saving leaves the previous one as the newest complete checkpoint. The loop (:mod:`.loop`) decides when
and on which process; these helpers read and write the pieces."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import nn

from ..errors import UsageError

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"
EMPTY = {"_empty": torch.zeros(1)}  # safetensors cannot write an empty file


def checkpoint_dir(root: Path, step: int, staging: bool = False) -> Path:
    return Path(root) / f"{'.tmp-' if staging else ''}{CHECKPOINT_PREFIX}{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return sorted(p for p in Path(root).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(Path(run_dir) / "checkpoints")
    return done[-1] if done else None


def publish(staging: Path, final: Path, keep: int) -> None:
    """Rename a fully written staging folder into place and delete all but the ``keep`` newest checkpoints."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in complete_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


# ---- trained weights --------------------------------------------------------------------------------
def write_weights(folder: Path, params: dict[str, list[tuple[str, nn.Parameter]]],
                  extra: dict[str, torch.Tensor]) -> None:
    """``{network}/{parameter}`` for every trained parameter, ``extra/{key}`` for a method's own tensors."""
    weights = {f"{net}/{n}": p.detach().cpu().contiguous() for net, named in params.items() for n, p in named}
    weights.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    st.save_file(weights, folder / "weights.safetensors")


@torch.no_grad()
def read_weights(ckpt: Path, params: dict[str, list[tuple[str, nn.Parameter]]]) -> dict[str, torch.Tensor]:
    """Copy the checkpoint's weights into ``params``; returns the method's extra tensors."""
    weights = st.load_file(ckpt / "weights.safetensors")
    for net, named in params.items():
        for n, p in named:
            key = f"{net}/{n}"
            if key not in weights:
                raise UsageError(f"{ckpt} lacks {key}; the config changed since it was written")
            p.copy_(weights[key])
    return {k[len("extra/"):]: v for k, v in weights.items() if k.startswith("extra/")}


# ---- optimisers, LR schedules, EMA -----------------------------------------------------------------------
def write_optimizers(folder: Path, opts: dict[str, torch.optim.Optimizer],
                     scheds: dict[str, torch.optim.lr_scheduler.LRScheduler]) -> dict[str, Any]:
    """Optimiser tensors to ``optimizer.safetensors``; returns the JSON part (with the LR schedules)."""
    tensors, meta = {}, {}
    for net, opt in opts.items():
        t, j = flatten_optimizer(opt.state_dict())
        tensors.update({f"{net}/{k}": v for k, v in t.items()})
        meta[net] = {"optimizer": j, "scheduler": scheds[net].state_dict()}
    st.save_file(tensors or EMPTY, folder / "optimizer.safetensors")
    return meta


def read_optimizers(ckpt: Path, meta: dict[str, Any], opts: dict[str, torch.optim.Optimizer],
                    scheds: dict[str, torch.optim.lr_scheduler.LRScheduler]) -> None:
    tensors = st.load_file(ckpt / "optimizer.safetensors")
    for net, opt in opts.items():
        j = meta[net]
        own = {k[len(net) + 1:]: v for k, v in tensors.items() if k.startswith(net + "/")}
        opt.load_state_dict(unflatten_optimizer(own, j["optimizer"]))
        scheds[net].load_state_dict(j["scheduler"])


def write_ema(folder: Path, emas: dict[str, Any]) -> dict[str, Any]:
    """Shadow parameters of Diffusers ``EMAModel`` s to ``ema.safetensors``; returns the JSON part."""
    tensors, meta = {}, {}
    for net, ema in emas.items():
        sd = ema.state_dict()
        tensors.update({f"{net}/{i}": p.detach().cpu().contiguous() for i, p in enumerate(sd["shadow_params"])})
        meta[net] = {k: v for k, v in sd.items() if k != "shadow_params"}
    st.save_file(tensors or EMPTY, folder / "ema.safetensors")
    return meta


def read_ema(ckpt: Path, meta: dict[str, Any], emas: dict[str, Any], device: torch.device) -> None:
    tensors = st.load_file(ckpt / "ema.safetensors")
    for net, ema in emas.items():
        sd = dict(meta[net])
        sd["shadow_params"] = [tensors[f"{net}/{i}"] for i in range(len(ema.shadow_params))]
        ema.load_state_dict(sd)
        ema.to(device=device)


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser ``state_dict`` as (tensors for safetensors, JSON with ``__tensor__`` placeholders)."""
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{idx}/{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(idx)][k] = "__tensor__"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entries in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"state/{idx}/{k}"] if v == "__tensor__" else v) for k, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- random number generators (one file per process) ---------------------------------------------------
def write_rng(folder: Path, process_index: int, gen: torch.Generator) -> None:
    st.save_file(rng_state(gen), folder / f"rng_rank{process_index}.safetensors")


def read_rng(ckpt: Path, process_index: int, gen: torch.Generator) -> None:
    rng_file = ckpt / f"rng_rank{process_index}.safetensors"
    if not rng_file.exists():
        raise UsageError(f"{ckpt} has no RNG state for process {process_index}; resume with the same number of "
                         f"processes it was written with")
    set_rng_state(gen, st.load_file(rng_file))


def rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": gen.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
