"""Tiny diffusers video models built from config (saved, then loaded by path), for tests and the video demo.

``UNet3DConditionModel`` is the ModelScope / zeroscope text-to-video UNet (spatial layers plus temporal
attention and temporal convolutions, the design VideoCrafter2 shares); ``UNetMotionModel`` is AnimateDiff's
(an SD UNet with motion modules). Both fold frames into the batch inside (``RoutingState.rows``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import build_scheduler, build_text_encoder, build_vae, tiny_unet_config, write_clip_tokenizer


def tiny_unet3d_config(sample_size: int = 8, in_channels: int = 4, cross_attention_dim: int = 32, **kw) -> dict:
    """A tiny ModelScope-shaped 3D UNet (``tiny_unet_config``'s sizes): cross-attention and temporal
    attention at the first level."""
    kw = {"down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
          "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"), **kw}
    return tiny_unet_config(sample_size, in_channels, cross_attention_dim, **kw)


def build_unet3d(folder: str | Path, seed: int = 0, **kw):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    UNet3DConditionModel(**tiny_unet3d_config(**kw)).save_pretrained(str(folder))
    return UNet3DConditionModel.from_pretrained(str(folder))


def build_unet_motion(folder: str | Path, seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32):
    """A tiny AnimateDiff UNetMotionModel (an SD UNet plus motion modules), saved and loaded by path."""
    from diffusers import UNetMotionModel

    torch.manual_seed(seed)
    UNetMotionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                    layers_per_block=1, down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
                    cross_attention_dim=cross_attention_dim, norm_num_groups=8,
                    num_attention_heads=4, motion_num_attention_heads=4,
                    motion_max_seq_length=16).save_pretrained(str(folder))
    return UNetMotionModel.from_pretrained(str(folder))


def build_video_pipeline(folder: str | Path, seed: int = 0, kind: str = "modelscope") -> Path:
    """A whole tiny text-to-video pipeline saved to ``folder/pipe``; returns that path.

    ``kind="modelscope"``: ``TextToVideoSDPipeline`` with a 3D UNet; ``kind="animatediff"``:
    ``AnimateDiffPipeline`` with a ``UNetMotionModel`` (motion modules already in the UNet).
    """
    from diffusers import AnimateDiffPipeline, DDIMScheduler, TextToVideoSDPipeline

    folder = Path(folder)
    tok = write_clip_tokenizer(folder / "_tok")
    parts = dict(vae=build_vae(folder / "_vae", seed=seed), tokenizer=tok,
                 text_encoder=build_text_encoder(folder / "_te", seed=seed, vocab_size=len(tok)))
    if kind == "modelscope":
        pipe = TextToVideoSDPipeline(unet=build_unet3d(folder / "_unet", seed=seed),
                                     scheduler=build_scheduler(folder / "_sched"), **parts)
    elif kind == "animatediff":
        build_scheduler(folder / "_sched")
        pipe = AnimateDiffPipeline(unet=build_unet_motion(folder / "_unet", seed=seed), motion_adapter=None,
                                   scheduler=DDIMScheduler.from_pretrained(str(folder / "_sched")), **parts)
    else:
        raise ValueError(f"kind must be 'modelscope' or 'animatediff', got {kind!r}")
    pipe.save_pretrained(str(folder / "pipe"))
    return folder / "pipe"
