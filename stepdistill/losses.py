"""Pure loss functions: tensors in, per-sample losses out (shape (B,)). The trainer reduces and weights
them (cf. NVlabs/edm training/loss.py). Paper and equation are named in each docstring."""

from __future__ import annotations

import torch


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error (DDPM 'simple' loss, Ho et al. 2020, Eq. 14)."""
    return per_sample_mean((pred - target) ** 2)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(||p - q||^2 + c^2) - c (Song & Dhariwal 2023, Sec. 3.3),
    computed per element and averaged as in Diffusers' LCM distillation example."""
    return per_sample_mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error (the pixel term of LDM's autoencoder loss, Rombach et al. 2022)."""
    return per_sample_mean((pred - target).abs())


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor, per: int) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent, divided by ``per`` (the number of pixel
    values, so a weight reads as LDM's ``kl_weight`` beside a per-pixel reconstruction mean)."""
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())
    return kl.reshape(kl.shape[0], -1).sum(dim=1) / per


def contrastive(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) image-text logit matrix (CLIP, Radford et al. 2021, Fig. 3), per pair.
    With ``labels`` every pair of equal labels is a positive (soft targets spread over them), so repeated
    classes in a batch are not pushed apart."""
    n = logits.shape[0]
    same = torch.eye(n, device=logits.device) if labels is None else \
        (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    logits = logits.float()
    rows = -(target * logits.log_softmax(dim=1)).sum(dim=1)
    cols = -(target.T * logits.T.log_softmax(dim=1)).sum(dim=1)
    return 0.5 * (rows + cols)


# ---- distribution matching (DMD, Yin et al. 2023; DMD2, Yin et al. 2024) ----------------------------------
def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Normalised distribution-matching gradient g = (f - r) / mean_{C,H,W} |x - r| (DMD Eq. 8 with DMD's
    per-sample weighting), in fp32 with non-finite values zeroed. Descending g moves x toward the real
    (teacher) x0-prediction r and away from the fake score's f."""
    x, r, f = x.detach().float(), real_x0.detach().float(), fake_x0.detach().float()
    norm = (x - r).abs().reshape(x.shape[0], -1).mean(dim=1).clamp_min(1e-8)
    g = (f - r) / norm.reshape((-1,) + (1,) * (x.ndim - 1))
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * mean ||x - stopgrad(x - g)||^2: its gradient w.r.t. x is g / (elements per sample),
    the DMD2 form (``0.5 * F.mse_loss(x, (x - g).detach())``) that hands g to autograd."""
    x = x.float()
    return 0.5 * per_sample_mean((x - (x - grad).detach()) ** 2)


def subinterval_score_matching(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Score matching within an SNR subinterval (Phased DMD, Fan et al. 2025, Sec. 3.3): per-sample weighted MSE
    between the fake score's prediction and the exact conditional target of ``schedules.subinterval_target``
    (``weight`` from ``subinterval_weight``, shape (B,) or broadcastable)."""
    return weight.reshape(-1).float() * mse(pred.float(), target.float())


def gan_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss softplus(D(fake)) + softplus(-D(real)) (DMD2 Sec. 4.3), per sample."""
    return per_sample_mean(torch.nn.functional.softplus(fake_logits.float())) + \
        per_sample_mean(torch.nn.functional.softplus(-real_logits.float()))


def gan_generator(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(G(z))) (DMD2 Sec. 4.3), per sample."""
    return per_sample_mean(torch.nn.functional.softplus(-fake_logits.float()))
