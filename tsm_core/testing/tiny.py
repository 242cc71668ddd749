"""Tiny diffusers / transformers models built from config, for tests and benchmarks.

Every builder saves its model to a folder and loads it back with ``from_pretrained(path)``,
so the loading code users run against the hub is the code under test (no network needed).
"""

from __future__ import annotations

from pathlib import Path

import torch

# A word list big enough that prompts tokenize into whole words, not single bytes.
WORDS = (
    "a photo of an the cat dog t-shirt top trouser pullover dress coat sandal shirt sneaker bag "
    "ankle boot red blue green big small drawing picture digit zero one two three four five six "
    "seven eight nine"
).split()


def write_clip_tokenizer(folder: str | Path, words=WORDS, model_max_length: int = 16):
    """A tiny CLIP BPE tokenizer holding ``words`` whole, written to ``folder`` and loaded by path.

    The package's builder (the one the embedded teacher ships with) does the work; it loads with
    ``from_pretrained(folder)`` like a real one.
    """
    from tsm_core.data.tokenizer import write_clip_tokenizer as build

    return build(folder, words, model_max_length)


def tiny_unet_config(sample_size: int = 16, in_channels: int = 4, cross_attention_dim: int = 32, **kw) -> dict:
    """A tiny SD-shaped UNet: cross-attention only at the low-resolution level."""
    cfg = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    cfg.update(kw)
    return cfg


def build_unet(folder: str | Path, seed: int = 0, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**tiny_unet_config(**kw)).save_pretrained(str(folder))
    return UNet2DConditionModel.from_pretrained(str(folder))


def build_text_encoder(folder: str | Path, seed: int = 0, hidden_size: int = 32, vocab_size: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size or 1000,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=hidden_size,
    )
    CLIPTextModel(cfg).save_pretrained(str(folder))
    return CLIPTextModel.from_pretrained(str(folder))


def build_scheduler(folder: str | Path, prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012, prediction_type=prediction_type, clip_sample=False).save_pretrained(str(folder))
    return DDPMScheduler.from_pretrained(str(folder))


def build_vae(folder: str | Path, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, sample_size=32).save_pretrained(str(folder))
    return AutoencoderKL.from_pretrained(str(folder))


def build_sd_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon", with_vae: bool = True):
    """A whole tiny StableDiffusionPipeline saved to ``folder`` and loaded back by path.

    With ``with_vae=False`` the UNet works in pixel space (3 channels) and the pipeline has no VAE,
    the shape of the embedded Fashion-MNIST teacher.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    tok = write_clip_tokenizer(folder / "_tok")
    text_encoder = build_text_encoder(folder / "_te", seed=seed, vocab_size=len(tok))
    unet = build_unet(folder / "_unet", seed=seed, in_channels=4 if with_vae else 3,
                      sample_size=8 if with_vae else 16)
    scheduler = build_scheduler(folder / "_sched", prediction_type=prediction_type)
    vae = build_vae(folder / "_vae", seed=seed) if with_vae else None
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"


def build_pixart(folder: str | Path, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=16, caption_channels=32, norm_num_groups=32,
        num_embeds_ada_norm=1000, use_additional_conditions=False,
    ).save_pretrained(str(folder))
    return PixArtTransformer2DModel.from_pretrained(str(folder))


def build_sd3(folder: str | Path, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).save_pretrained(str(folder))
    return SD3Transformer2DModel.from_pretrained(str(folder))


def build_sdxl_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A whole tiny StableDiffusionXLPipeline saved to ``folder/pipe`` (latent 8x8, images 16x16).

    The UNet has SDXL's ``text_time`` micro-conditioning: its added embedding takes the second text
    encoder's pooled projection (32) plus six time ids of 8 each; cross-attention sees both encoders'
    hidden states side by side (32 + 32).
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tok = write_clip_tokenizer(folder / "_tok")
    torch.manual_seed(seed)
    clip = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=32)
    unet = UNet2DConditionModel(**tiny_unet_config(
        sample_size=8, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True))
    pipe = StableDiffusionXLPipeline(
        vae=build_vae(folder / "_vae", seed=seed), text_encoder=CLIPTextModel(clip), text_encoder_2=CLIPTextModelWithProjection(clip),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=build_scheduler(folder / "_sched", prediction_type),
        add_watermarker=False)
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"
