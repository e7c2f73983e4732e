"""Memory-efficient attention and gradient checkpointing for Diffusers networks.

``auto``: xformers when it is installed and the network is on CUDA, else PyTorch SDPA
(``AttnProcessor2_0``, Diffusers' default on torch 2). ``xformers`` asked for explicitly where it
cannot run is a usage error, not a silent fallback.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .errors import UsageError


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def set_attention(net: nn.Module, backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Select the attention backend of a Diffusers model; returns the one in use ('none' if no attention)."""
    if not hasattr(net, "set_attn_processor") or not getattr(net, "attn_processors", None):
        return "none"
    on_cuda = torch.device(device).type == "cuda" if device is not None else \
        next(net.parameters()).device.type == "cuda"
    use_xformers = backend == "xformers" or (backend == "auto" and xformers_available() and on_cuda)
    if use_xformers:
        if not xformers_available():
            raise UsageError("attention=xformers but xformers is not installed; pip install 'stepdistill[xformers]' "
                             "or use attention=sdpa")
        if not on_cuda:
            raise UsageError("attention=xformers needs a CUDA device; use attention=sdpa (or auto) on CPU")
        net.enable_xformers_memory_efficient_attention()
        return "xformers"
    from diffusers.models.attention_processor import AttnProcessor2_0

    net.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def configure_network(net: nn.Module, train_cfg) -> None:
    """Apply the train config's attention backend and gradient checkpointing to one trainable network."""
    device = "cuda" if (torch.cuda.is_available() and train_cfg.device != "cpu") else "cpu"
    set_attention(net, train_cfg.attention, device)
    if train_cfg.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
        from .lora import checkpoint_keeping_adapters  # adapters of a shared base: recompute with the right one

        net.enable_gradient_checkpointing(checkpoint_keeping_adapters)
