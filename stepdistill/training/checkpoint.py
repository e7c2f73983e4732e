"""Checkpoint files: ``RUN/checkpoints/step-NNNNNNN/`` holds ``weights`` (trained parameters and a method's
extra tensors), ``optimizer``, ``ema`` and ``rng_rank{i}`` safetensors plus ``state.json`` (step, JSON
state). A checkpoint is written into a hidden staging folder and renamed into place, so a crash while
saving leaves the previous one as the newest complete checkpoint. ``state.json`` is written last and lists
every other file with its sha256; :func:`verify` checks them before a resume trusts the checkpoint (a torn,
truncated or altered file fails it). The loop (:mod:`.loop`) decides when and on which process, and checks
that what it writes is finite (:func:`nonfinite`); these helpers read and write the pieces."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import safetensors.torch as st
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import UsageError
from ..userfiles import sha256
from .distributed import like, sharded

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"
EMPTY = {"_empty": torch.zeros(1)}  # safetensors cannot write an empty file


class CorruptCheckpoint(Exception):
    """A checkpoint that fails :func:`verify` (unreadable state, a file missing, torn or altered)."""


def checkpoint_dir(root: Path, step: int, staging: bool = False) -> Path:
    return Path(root) / f"{'.tmp-' if staging else ''}{CHECKPOINT_PREFIX}{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return sorted(p for p in Path(root).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists())


def staging_dirs(root: Path) -> list[Path]:
    """Staging folders a crashed or failed write left under ``root``."""
    return sorted(Path(root).glob(f".tmp-{CHECKPOINT_PREFIX}*"))


def set_aside(ckpt: Path) -> Path:
    """Rename a checkpoint that failed :func:`verify` to a hidden ``.corrupt-step-N`` beside it (kept for a look,
    no longer a resume candidate); returns the new path."""
    aside = ckpt.with_name(f".corrupt-{ckpt.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(ckpt, aside)
    return aside


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
    """``state.json``, written after every other file: the state plus ``files``, each file's sha256, and
    ``state_sha256``, the hash of the rest of ``state.json`` itself."""
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}
    body = {**state, "files": files}
    (folder / STATE_FILE).write_text(json.dumps({**body, "state_sha256": _digest(body)}))


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's state if every file ``state.json`` lists is there with its sha256; CorruptCheckpoint
    naming the first problem otherwise. A checkpoint written before files were hashed is read in full instead:
    its safetensors files must load and hold finite values."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpoint(f"{STATE_FILE} is unreadable: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"{STATE_FILE} holds no step")
    files = state.get("files")
    if "state_sha256" in state and state["state_sha256"] != _digest({k: v for k, v in state.items()
                                                                     if k != "state_sha256"}):
        raise CorruptCheckpoint(f"{STATE_FILE} does not match its recorded sha256")
    if files is None:
        for f in sorted(ckpt.glob("*.safetensors")):
            try:
                bad = nonfinite(st.load_file(f).items())
            except (SafetensorError, OSError) as e:
                raise CorruptCheckpoint(f"{f.name} is unreadable: {str(e).splitlines()[0]}") from None
            if bad:
                raise CorruptCheckpoint(f"{f.name} holds non-finite values ({describe_nonfinite(bad)})")
        return state
    if not isinstance(files, dict):
        raise CorruptCheckpoint(f"{STATE_FILE} lists no files")
    for name, digest in files.items():
        f = ckpt / name
        if "/" in name or name in ("", ".", "..") or not f.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if sha256(f) != digest:
            raise CorruptCheckpoint(f"{name} does not match its recorded sha256")
    return state


def nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """{name: number of NaN / inf values} of the floating-point tensors that hold any."""
    out = {}
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                out[name] = n
    return out


def describe_nonfinite(bad: dict[str, int]) -> str:
    first = next(iter(bad))
    return f"{sum(bad.values())} NaN/inf values in {len(bad)} tensor(s), first {first}"


# ---- trained weights --------------------------------------------------------------------------------
def write_weights(folder: Path, params: dict[str, list[tuple[str, torch.Tensor]]],
                  extra: dict[str, torch.Tensor]) -> None:
    """``{network}/{parameter}`` for every trained parameter, ``extra/{key}`` for a method's own tensors (whole
    tensors: the loop gathers sharded ones first)."""
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
            p.copy_(like(weights[key], p))
    return {k[len("extra/"):]: v for k, v in weights.items() if k.startswith("extra/")}


# ---- optimisers, LR schedules, EMA -----------------------------------------------------------------------
def write_optimizers(folder: Path, states: dict[str, dict],
                     scheds: dict[str, torch.optim.lr_scheduler.LRScheduler]) -> dict[str, Any]:
    """Optimiser state dicts (whole tensors) to ``optimizer.safetensors``; returns the JSON part (with the LR
    schedules)."""
    tensors, meta = {}, {}
    for net, state in states.items():
        t, j = flatten_optimizer(state)
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
        opt.load_state_dict(_laid_out(unflatten_optimizer(own, j["optimizer"]), opt))
        scheds[net].load_state_dict(j["scheduler"])


def _laid_out(sd: dict, opt: torch.optim.Optimizer) -> dict:
    """An optimiser state dict of whole tensors with each parameter-shaped state sharded as its parameter is."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for idx, state in sd["state"].items():
        p = params[int(idx)]
        if sharded(p):
            sd["state"][idx] = {k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                                for k, v in state.items()}
    return sd


def write_ema(folder: Path, states: dict[str, dict]) -> dict[str, Any]:
    """Diffusers ``EMAModel`` state dicts (whole shadow tensors) to ``ema.safetensors``; returns the JSON part."""
    tensors, meta = {}, {}
    for net, sd in states.items():
        tensors.update({f"{net}/{i}": p.detach().cpu().contiguous() for i, p in enumerate(sd["shadow_params"])})
        meta[net] = {k: v for k, v in sd.items() if k != "shadow_params"}
    st.save_file(tensors or EMPTY, folder / "ema.safetensors")
    return meta


def read_ema(ckpt: Path, meta: dict[str, Any], emas: dict[str, Any], device: torch.device) -> None:
    tensors = st.load_file(ckpt / "ema.safetensors")
    for net, ema in emas.items():
        sd = dict(meta[net])
        sd["shadow_params"] = [like(tensors[f"{net}/{i}"], s) for i, s in enumerate(ema.shadow_params)]
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
