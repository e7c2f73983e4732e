"""A Diffusers pipeline for class-conditional pixel ``UNet2DModel``s (the digits benchmark), any scheduler."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..denoisers import Denoiser
from ..models import ClassConditioner
from ..schedules import NoiseSchedule
from .sampling import sample


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=1.0, generator=...)``.

    Class id ``num_class_embeds - 1`` is the unconditional class used for classifier-free guidance.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int] | torch.Tensor, num_inference_steps: int = 50,
                 timesteps: Sequence[int] | None = None, guidance_scale: float = 1.0, eta: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        labels = torch.as_tensor(class_labels, device=self.device).long()
        cfg = self.unet.config
        schedule = NoiseSchedule(self.scheduler.alphas_cumprod)
        denoiser = Denoiser(self.unet, schedule, self.scheduler.config.prediction_type)
        cond = ClassConditioner(cfg.num_class_embeds - 1, self.device).encode(labels) if cfg.num_class_embeds else None
        shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = sample(denoiser, self.scheduler, shape, cond, num_inference_steps=None if timesteps else num_inference_steps,
                   timesteps=timesteps, guidance=guidance_scale, eta=eta, generator=generator, latents=latents,
                   device=self.device, dtype=self.unet.dtype)
        if output_type in ("latent", "pt"):
            images = x if output_type == "latent" else (x / 2 + 0.5).clamp(0, 1)
        else:
            images = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


