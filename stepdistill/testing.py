"""Tiny, randomly initialised SD1.5-shaped and SDXL-shaped pipelines built in code (no hub), for tests and
smoke runs of the real-scale code paths. Same module names and structure as the real models."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip_tokenizer(out_dir: Path, max_length: int = 16):
    """A character-level CLIP BPE tokenizer (256 byte symbols, their end-of-word forms, no merges)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=max_length)
    tok.save_pretrained(out_dir)
    return tok


def tiny_sd_pipeline(out_dir: Path, sdxl: bool = False, seed: int = 0, prediction_type: str = "epsilon",
                     width: int = 16, latent_size: int = 8) -> Path:
    """Save a tiny random StableDiffusion(XL)Pipeline folder (latent_size^2 x 4 latents, RGB images twice as
    large); ``width`` scales the UNet's channels (16 -> ~0.1M parameters, 128 -> ~12M)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = tiny_clip_tokenizer(out_dir / "_tok")
    text_cfg = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=16)
    enc = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
    unet_kw = dict(sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width),
                   layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8,
                   cross_attention_dim=16)
    if sdxl:
        unet_kw.update(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                       projection_class_embeddings_input_dim=16 + 6 * 4, transformer_layers_per_block=1)
    unet = UNet2DConditionModel(**unet_kw).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=2 * latent_size).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=prediction_type)
    if sdxl:
        enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)).eval()
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir
