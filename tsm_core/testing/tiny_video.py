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


# Block types of UNet2DConditionModel and the UNet3DConditionModel blocks with the same spatial layers.
_BLOCKS_3D = {"DownBlock2D": "DownBlock3D", "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
              "UpBlock2D": "UpBlock3D", "CrossAttnUpBlock2D": "CrossAttnUpBlock3D"}


def inflate_unet2d(unet2d):
    """A ``UNet3DConditionModel`` that starts as ``unet2d`` applied to every frame on its own.

    The spatial layers (resnets, spatial attention, time embedding, in/out convs) take the 2D UNet's
    weights under the same names. The temporal layers diffusers adds are made the identity: the last
    convolution of every temporal conv block is already zero at init (diffusers), and the output
    projection of every temporal transformer (``transformer_in``, ``temp_attentions``) is zeroed here.
    So at step 0 a video of identical frames gives the image model's output on each frame, and
    post-pretraining on clips has to learn the motion: the "pretrained image model, new temporal
    layers" start of AnimateDiff and of VideoCrafter2's spatial-plus-temporal design.

    Raises:
        ValueError: a 2D block type without a 3D counterpart in diffusers (only the SD-style down/up
            blocks and the cross-attention mid block inflate), or weights that do not fit.
    """
    from diffusers import UNet3DConditionModel

    c = unet2d.config
    blocks = [*c.down_block_types, *c.up_block_types]
    missing = [b for b in blocks if b not in _BLOCKS_3D]
    if missing or c.mid_block_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"cannot inflate block types {missing or [c.mid_block_type]}: UNet3DConditionModel has "
                         f"counterparts only for {sorted(_BLOCKS_3D)} and UNetMidBlock2DCrossAttn")
    unet3d = UNet3DConditionModel(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        down_block_types=tuple(_BLOCKS_3D[b] for b in c.down_block_types),
        up_block_types=tuple(_BLOCKS_3D[b] for b in c.up_block_types),
        block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
        downsample_padding=c.downsample_padding, mid_block_scale_factor=c.mid_block_scale_factor,
        act_fn=c.act_fn, norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps,
        cross_attention_dim=c.cross_attention_dim, attention_head_dim=c.attention_head_dim)
    own = unet3d.state_dict()
    spatial = unet2d.state_dict()
    for k, v in spatial.items():
        # The 3D UNet's spatial transformers project with Linear layers where the 2D UNet (use_linear_projection
        # false) has 1x1 convolutions: the same map over channels, so the kernel is reshaped.
        if k in own and v.ndim == 4 and v.shape[2:] == (1, 1) and own[k].shape == v.shape[:2]:
            spatial[k] = v[:, :, 0, 0]
    unexpected = sorted(set(spatial) - set(own))
    wrong = [k for k in spatial if k in own and own[k].shape != spatial[k].shape]
    if unexpected or wrong:
        raise ValueError(f"the 2D UNet's weights do not fit the 3D UNet: unexpected {unexpected[:5]}, "
                         f"other shapes {wrong[:5]}")
    unet3d.load_state_dict(spatial, strict=False)
    temporal = [unet3d.transformer_in] + [m for block in (*unet3d.down_blocks, unet3d.mid_block, *unet3d.up_blocks)
                                          for m in getattr(block, "temp_attentions", [])]
    with torch.no_grad():
        for transformer in temporal:
            transformer.proj_out.weight.zero_()
            transformer.proj_out.bias.zero_()
    return unet3d
