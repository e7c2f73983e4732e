"""A Diffusers pipeline for class-conditional pixel ``UNet2DModel``s (the digits benchmark), any scheduler."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..denoisers import Denoiser
from ..conditioners import ClassConditioner
from ..schedules import NoiseSchedule
from .sampling import sample


class ClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=1.0, generator=...)``.

    Class id ``num_class_embeds - 1`` is the unconditional class used for classifier-free guidance.
    ``callback_on_step_end(pipe, i, t, {"latents": x, "x0": x0_pred})`` runs after every step as in stock
    pipelines (it observes; setting ``pipe._interrupt = True`` stops the loop there, which is how the hybrid
    sampler hands a partial schedule's latents to another model).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "x0"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int] | torch.Tensor, num_inference_steps: int = 50,
                 timesteps: Sequence[int] | None = None, guidance_scale: float = 1.0, eta: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)):
        labels = torch.as_tensor(class_labels, device=self.device).long()
        cfg = self.unet.config
        schedule = NoiseSchedule(self.scheduler.alphas_cumprod)
        denoiser = Denoiser(self.unet, schedule, self.scheduler.config.prediction_type)
        cond = ClassConditioner(cfg.num_class_embeds - 1, self.device).encode(labels) if cfg.num_class_embeds else None
        shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self._interrupt = False
        if latents is not None:  # as in stock pipelines, given latents are scaled by the scheduler's init_noise_sigma
            self.scheduler.set_timesteps(**({"timesteps": list(timesteps)} if timesteps else
                                            {"num_inference_steps": num_inference_steps}), device=self.device)
            latents = latents.to(self.device) * self.scheduler.init_noise_sigma

        def step_end(i, t, x, x0):
            if callback_on_step_end is not None:
                tensors = {"latents": x, "x0": x0}
                callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
            return self._interrupt

        x = sample(denoiser, self.scheduler, shape, cond, num_inference_steps=None if timesteps else num_inference_steps,
                   timesteps=timesteps, guidance=guidance_scale, eta=eta, generator=generator, latents=latents,
                   device=self.device, dtype=self.unet.dtype, callback=step_end)
        if output_type in ("latent", "pt"):
            images = x if output_type == "latent" else (x / 2 + 0.5).clamp(0, 1)
        else:
            images = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)


