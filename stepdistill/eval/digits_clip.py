"""Asset recipe of ``digits-clip`` (``stepdistill assets build digits-clip``): train the small open_clip CLIP
(configs/digits/clip.yaml), install its export, and measure it on the held-out real digits."""

from __future__ import annotations

import torch


@torch.no_grad()
def measure(folder) -> dict:
    """Zero-shot digit accuracy on held-out digits (canonical prompt, and averaged over all templates) and the
    mean CLIP score of matching vs mismatched (next digit) prompts."""
    from ..data.digits import load_digits_tensor
    from ..data.prompts import TEMPLATES, digit_prompt
    from .clip_score import CLIPScorer, clip_score_from_embeddings

    scorer = CLIPScorer("digits-clip", str(folder))
    images, labels = load_digits_tensor(16, "heldout")
    img = scorer.image_embeddings(images / 2 + 0.5)  # (N, D), unit norm
    accs = []
    for t in TEMPLATES:
        txt = scorer.text_embeddings([digit_prompt(d, t) for d in range(10)])
        accs.append(float(((img @ txt.T).argmax(1) == labels).double().mean()))
    txt = scorer.text_embeddings([digit_prompt(d) for d in range(10)])
    return {"heldout_images": len(labels), "zero_shot_accuracy": round(accs[0], 4),
            "zero_shot_accuracy_all_templates": round(sum(accs) / len(accs), 4),
            "clip_score_matched": round(float(clip_score_from_embeddings(img, txt[labels]).mean()), 2),
            "clip_score_mismatched": round(float(clip_score_from_embeddings(img, txt[(labels + 1) % 10]).mean()), 2),
            "num_parameters": sum(p.numel() for p in scorer.model.parameters())}


def build(b) -> dict:
    b.install(b.pretrain(b.spec.configs[0]))
    return measure(b.out)
