"""A tiny FLUX.1 pipeline folder built from config, for the Flux backbone, distillation and fine-tuning tests.

It has FLUX.1-dev's structure at toy widths: double- and single-stream blocks, the guidance embedding, a CLIP
text encoder (pooled output only) and a T5 encoder, a VAE without quant convs and with a shift factor, and
FLUX.1-dev's scheduler config (dynamic shifting, mu between 0.5 and 1.15). The T5 slot reuses the tiny CLIP
tokenizer (`tsm_core.testing.tiny_dit`: T5 tokenizers cannot be downloaded here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tsm_core.testing import tiny
from tsm_core.testing.tiny_dit import _tiny_t5

FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
"""FLUX.1-dev's ``scheduler/scheduler_config.json``."""


def build_flux_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 16, guidance_embeds: bool = True,
                        latent_channels: int = 4) -> Path:
    """A whole tiny FluxPipeline saved to ``folder/pipe``: latents ``sample_size`` per side (the VAE's native
    size, images twice that; packed into (sample_size / 2)^2 tokens), ``latent_channels`` VAE channels
    (the transformer's input is 4x that), two double- and two single-stream blocks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tok = tiny.write_clip_tokenizer(folder / "_tok")
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=8))
    t5 = _tiny_t5(len(tok), d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))  # the rotary axes (id, row, column) sum to the head width
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=2 * sample_size,
                        scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"
