"""Build recipes of the shipped assets (see ``registry.py``): run the pretrain config(s), install the
export, measure what the asset is for, return the metrics recorded in ``asset.json``."""

from __future__ import annotations

import torch

from .build import Builder, config_path

DIGITS_SAMPLE_SEED = 1234


def toy2d_mlp(b: Builder) -> dict:
    """The toy2d MLP; metrics: DDIM-50 samples of the MLP and, as the reference, of the exact teacher."""
    from diffusers import DDIMScheduler

    from ..config import load_config
    from ..data.toy2d import GaussianMixtureX0, MixtureSpec, toy_metrics
    from ..denoisers import Denoiser
    from ..models import DEFAULT_SCHEDULER, load_mlp
    from ..pipelines import sample, seeded_generators
    from ..schedules import NoiseSchedule

    config = b.spec.configs[0]
    b.install(b.pretrain(config))
    cfg = load_config(config_path(config), b.overrides)
    net, pred = load_mlp(b.out)
    sched_cfg = {**DEFAULT_SCHEDULER, **cfg.model.scheduler, "prediction_type": pred}
    schedule, spec = NoiseSchedule.from_scheduler_config(sched_cfg), MixtureSpec.from_config(cfg.data)
    n = 2000

    def ddim50(denoiser):  # the scheduler reads the network output in the denoiser's prediction type
        scheduler = DDIMScheduler.from_config({**sched_cfg, "prediction_type": denoiser.prediction_type})
        x = sample(denoiser, scheduler, (n, 2), num_inference_steps=50, generator=seeded_generators(0, n))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in toy_metrics(x, spec).items()}

    exact = Denoiser(GaussianMixtureX0(spec, schedule), schedule, "sample")
    return {"samples": n, "sampler": "DDIM-50", "mlp": ddim50(Denoiser(net.eval(), schedule, pred)),
            "exact_teacher": ddim50(exact), "num_parameters": _num_params(net)}


def digits_classifier(b: Builder) -> dict:
    """The digit classifier; metrics: accuracy on the held-out and train splits."""
    from ..classifier import accuracy, load_classifier
    from ..data.digits import load_digits_tensor

    b.install(b.pretrain(b.spec.configs[0]))
    net = load_classifier(b.out)
    x, y = load_digits_tensor(net.config["resolution"], "heldout")
    xt, yt = load_digits_tensor(net.config["resolution"], "train")
    return {"heldout_accuracy": round(accuracy(net, x, y), 4), "heldout_size": len(y),
            "train_accuracy": round(accuracy(net, xt, yt), 4), "num_parameters": _num_params(net)}


def digits_teacher(b: Builder) -> dict:
    """The class-conditional digits teacher; metrics: class accuracy of DDIM-50 samples (shipped classifier)."""
    from ..classifier import load_classifier
    from ..pipelines.class_conditional import ClassConditionalPipeline

    b.install(b.pretrain(b.spec.configs[0]))
    pipe = ClassConditionalPipeline.from_pretrained(b.out)
    clf = load_classifier(b.asset("digits-classifier"))
    metrics = {"num_parameters": _num_params(pipe.unet), "prediction_type": pipe.scheduler.config.prediction_type}
    for guidance in (1.0, 2.0):
        metrics[f"ddim50_guidance{guidance:g}"] = sample_accuracy(pipe, clf, per_class=50, guidance=guidance)
    return metrics


@torch.no_grad()
def sample_accuracy(pipe, classifier, per_class: int = 50, steps: int = 50, guidance: float = 1.0,
                    seed: int = DIGITS_SAMPLE_SEED) -> dict:
    """Share of class-conditional samples (``per_class`` per digit, per-sample seeds) the classifier assigns
    to the class they were drawn for, overall and for the worst class."""
    import time

    from ..pipelines import seeded_generators

    labels = torch.arange(10).repeat_interleave(per_class)
    t0 = time.time()
    images = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
                  generator=seeded_generators(seed, len(labels)), output_type="pt").images * 2 - 1
    seconds = time.time() - t0
    hit = (classifier.predict(images).cpu() == labels).double()
    per = hit.view(10, per_class).mean(1)
    return {"accuracy": round(float(hit.mean()), 4), "worst_class": int(per.argmin()),
            "worst_class_accuracy": round(float(per.min()), 4), "samples": len(labels), "steps": steps,
            "guidance": guidance, "seed": seed, "seconds": round(seconds, 1)}


def _num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
