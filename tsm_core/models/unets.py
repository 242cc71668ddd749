"""UNet families (`tsm_core.models.base.Backbone`), each registered in `tsm_core.models.registry`:

- ``"unet"``: Stable Diffusion 1.x / 2.x folders (UNet2DConditionModel + CLIP text encoder), DDPM
  noise, epsilon or v prediction (read from the scheduler config). Pixel-space pipelines without a
  VAE (the embedded Fashion-MNIST teacher) work too: `Backbone.vae_encode` is then the identity.
- ``"sdxl"``: SDXL folders (the UNet with ``text_time`` micro-conditioning, two CLIP text encoders),
  DDPM noise, epsilon or v prediction.
- ``"unet3d"``: text-to-video UNets, ModelScope / zeroscope (UNet3DConditionModel + CLIP; the
  spatial-plus-temporal 3D UNet design VideoCrafter2 shares), DDPM noise. Samples are videos
  ``(B, C, F, h, w)``; the VAE encodes and decodes them frame by frame.
- ``"animatediff"``: AnimateDiff's UNetMotionModel (an SD UNet with motion modules), the same way; its
  text states are repeated per frame, as AnimateDiff's pipeline does.
"""

from __future__ import annotations

import os

import torch

from .base import (
    Backbone,
    Cond,
    _check_source,
    _clip_outputs,
    _load,
    _meta_empty,
    _token_ids,
    pipeline_has_component,
)
from .schedule import NoiseSchedule


class UNetBackbone(Backbone):
    """Stable Diffusion 1.x/2.x: UNet2DConditionModel, CLIP text encoder, DDPM noise (eps or v)."""

    kind = "unet"
    distillable = True
    denoiser_class = "UNet2DConditionModel"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"UNet backbones train epsilon or v_prediction models; the scheduler config says "
                             f"{self.prediction_type!r}")
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **_) -> UNetBackbone:
        """Load ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` and (if present) ``vae`` subfolders."""
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import AutoTokenizer, CLIPTextModel

        path = _check_source(path)
        unet = _load(getattr(diffusers, cls.denoiser_class), path, "unet")
        te = _load(CLIPTextModel, path, "text_encoder")
        tok = _load(AutoTokenizer, path, "tokenizer")
        # Whatever scheduler the pipeline ships (PNDM for SD1.5), training noise is DDPM with its betas.
        sched = _load(DDPMScheduler, path, "scheduler")
        vae = _load(AutoencoderKL, path, "vae") if pipeline_has_component(path, "vae") else None
        return cls(unet, [te], [tok], vae, sched, path=path)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        ids = _token_ids(self.tokenizers[0], prompts, self.device)
        return {"encoder_hidden_states": self.text_encoders[0](ids)[0]}

    def predict(self, x_t, t, cond, denoiser=None):
        return (denoiser or self.denoiser)(x_t, t.to(x_t.device), encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def add_noise(self, x0, noise, t):
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return self.schedule.target(x0, noise, t)

    def to_x0(self, x_t, output, t):
        return self.schedule.to_x0(x_t, output, t)

    def sampling_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing",
                                         set_alpha_to_one=False)


# ----------------------------------------------------------------------------- SDXL


class SDXLBackbone(UNetBackbone):
    """SDXL: UNet2DConditionModel with ``addition_embed_type: text_time``, two CLIP text encoders (the
    second with projection), DDPM noise (eps or v), as diffusers' StableDiffusionXLPipeline runs it.

    The conditioning adds SDXL's micro-conditioning: ``text_embeds`` (the second encoder's pooled,
    projected embedding) and ``time_ids`` = (original h, w, crop top, left, target h, w), here
    ``(size, size, 0, 0, size, size)`` at the training resolution ``size`` (pixels), no crop, which is
    what the pipeline passes for an uncropped square image and what DMD2's SDXL runs condition on.
    """

    kind = "sdxl"

    def __init__(self, *a, resolution: int | None = None, **kw):
        super().__init__(*a, **kw)
        self.resolution = resolution or self.latent_size * self.vae_scale

    def meta_cond(self, batch: int, dtype: torch.dtype) -> Cond:
        """Meta conditioning of ``batch`` prompts: both CLIPs' states, the pooled embedding and the time ids."""
        cond = super().meta_cond(batch, dtype)
        cond.update(text_embeds=_meta_empty((batch, self.text_encoders[-1].config.projection_dim), dtype),
                    time_ids=_meta_empty((batch, 6), dtype))
        return cond

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **_) -> SDXLBackbone:
        """Load ``unet``, ``text_encoder`` (CLIP), ``text_encoder_2`` (CLIP with projection), both tokenizers,
        ``scheduler`` (as DDPM) and ``vae``."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        path = _check_source(path)
        unet = _load(UNet2DConditionModel, path, "unet")
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError(f"{path}: the UNet has addition_embed_type {unet.config.addition_embed_type!r}, not "
                             "'text_time', so it is not an SDXL UNet; use model.kind: unet for SD1.5/SD2 folders")
        tes = [_load(CLIPTextModel, path, "text_encoder"), _load(CLIPTextModelWithProjection, path, "text_encoder_2")]
        toks = [_load(AutoTokenizer, path, "tokenizer"), _load(AutoTokenizer, path, "tokenizer_2")]
        return cls(unet, tes, toks, _load(AutoencoderKL, path, "vae"), _load(DDPMScheduler, path, "scheduler"),
                   path=path)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        outs = _clip_outputs(self.tokenizers, self.text_encoders, prompts, self.device)
        hidden = [out.hidden_states[-2] for out in outs]  # the penultimate layer of both, as SDXL was trained
        pooled = outs[-1].text_embeds  # the second encoder's projected pooled output
        size = float(self.resolution)
        time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=self.device).expand(len(prompts), 6)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled,
                "time_ids": time_ids.to(pooled.dtype)}

    def as_unconditional(self, cond: Cond) -> Cond:
        """Zeros for the text states and the pooled embedding, the same ``time_ids``: SDXL's unconditional
        input in DMD2's SDXL runs and in diffusers' pipeline (``force_zeros_for_empty_prompt``)."""
        return {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}

    def predict(self, x_t, t, cond, denoiser=None):
        return (denoiser or self.denoiser)(
            x_t, t.to(x_t.device), encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample


# ----------------------------------------------------------------------------- PixArt-alpha


class VideoUNetBackbone(UNetBackbone):
    """Text-to-video 3D UNet (ModelScope / zeroscope): UNet3DConditionModel + CLIP, DDPM noise (eps or v).

    Samples are videos ``(B, C, F, h, w)`` (pixels ``(B, 3, F, H, W)`` in [-1, 1]); the noise schedule
    broadcasts over frames, so every frame of a video shares its timestep, and the TSM layers route
    the frames and pixels the UNet folds into its batch by their video (``RoutingState.rows``).
    ``num_frames`` is the length of sampled videos (the trainer sets it from ``data.num_frames``).
    """

    kind = "unet3d"
    distillable = False
    video = True
    denoiser_class = "UNet3DConditionModel"
    num_frames: int = 16

    def vae_encode(self, pixels, generator=None):
        """Videos (B, 3, F, H, W) -> latents (B, C, F, h, w), frame by frame (images pass through)."""
        if pixels.ndim != 5:
            return super().vae_encode(pixels, generator)
        b, _, f = pixels.shape[:3]
        z = super().vae_encode(pixels.transpose(1, 2).flatten(0, 1), generator)  # (B*F, C, h, w)
        return z.unflatten(0, (b, f)).transpose(1, 2)

    def vae_decode(self, latents):
        """Latents (B, C, F, h, w) -> videos (B, 3, F, H, W) in [-1, 1], frame by frame."""
        if latents.ndim != 5:
            return super().vae_decode(latents)
        b, _, f = latents.shape[:3]
        x = super().vae_decode(latents.transpose(1, 2).flatten(0, 1))
        return x.unflatten(0, (b, f)).transpose(1, 2)

    def noise_shape(self, n, side):
        return (n, self.latent_channels, self.num_frames, side, side)


class MotionUNetBackbone(VideoUNetBackbone):
    """AnimateDiff: UNetMotionModel (an SD UNet with motion modules) + CLIP, DDPM noise.

    The motion UNet takes the text states per frame, (B*F, L, D), as AnimateDiffPipeline passes them.
    """

    kind = "animatediff"
    denoiser_class = "UNetMotionModel"

    def predict(self, x_t, t, cond, denoiser=None):
        text = cond["encoder_hidden_states"].repeat_interleave(x_t.shape[2], dim=0)
        return (denoiser or self.denoiser)(x_t, t.to(x_t.device), encoder_hidden_states=text).sample


def video_strip(videos: torch.Tensor) -> torch.Tensor:
    """Videos (N, 3, F, H, W) -> images (N, 3, H, F*W): each video's frames side by side, for grids."""
    return videos.permute(0, 1, 3, 2, 4).flatten(3, 4)
