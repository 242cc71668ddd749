"""Tiny PixArt-alpha and SD3 pipeline folders built from config, for the backbone and trainer tests.

T5 tokenizers cannot be downloaded here, so the T5 slots reuse the tiny CLIP BPE tokenizer files
(AutoTokenizer loads whatever class the folder names); the T5 encoders are tiny, built from config,
with a vocabulary large enough for the CLIP tokenizer's ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tsm_core.testing import tiny


def _tiny_vae(shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, shift_factor=shift_factor)


def _tiny_t5(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))


def build_pixart_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A whole tiny PixArtAlphaPipeline saved to ``folder/pipe`` (latent 8x8, images 16x16)."""
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    folder = Path(folder)
    tok = tiny.write_clip_tokenizer(folder / "_tok")
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=16, caption_channels=32, norm_num_groups=32,
        num_embeds_ada_norm=1000, use_additional_conditions=False,
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                          prediction_type="epsilon", clip_sample=False)
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=_tiny_t5(len(tok)), vae=_tiny_vae(),
                               transformer=transformer, scheduler=sched)
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"


def build_sd3_pipeline(folder: str | Path, seed: int = 0, with_t5: bool = False, sample_size: int = 8) -> Path:
    """A whole tiny StableDiffusion3Pipeline saved to ``folder/pipe`` (T5 slot empty unless ``with_t5``;
    latents ``sample_size`` per side, images twice that)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    tok = tiny.write_clip_tokenizer(folder / "_tok")
    torch.manual_seed(seed)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=8))

    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=max(16, sample_size // 2),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(0.0),
        text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tok,
        text_encoder_3=_tiny_t5(len(tok)) if with_t5 else None, tokenizer_3=tok if with_t5 else None,
    )
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"
