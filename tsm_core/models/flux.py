"""FLUX.1 (``"flux"``): FluxTransformer2DModel, CLIP-L (pooled) + T5-XXL, a 16-channel VAE, rectified flow.

Flux shares SD3's forward process (`tsm_core.models.dits.SD3Backbone`): ``x_t = (1 - s) x0 + s noise``, the
transformer predicts ``v = noise - x0`` and ``t = s * 1000`` is what the TSM intervals receive. What Flux adds,
each as diffusers' ``FluxPipeline`` does it:

* **Packing.** Model space stays the VAE latent ``(B, C, h, w)`` (as for every family: the rollout, the real
  latents and the GAN head see images); `FluxBackbone.predict` packs it into 2x2 patches
  ``(B, h/2 * w/2, 4C)`` (`pack_latents`), with the image position ids ``(0, row, col)`` per patch and zero
  text ids, and unpacks the output. The transformer takes ``timestep = t / 1000`` and scales it back itself.
* **Text.** The CLIP-L encoder gives only its pooled output (``pooled_projections``); the T5-XXL encoder's
  last hidden states are the text tokens (``max_sequence_length`` 512 for FLUX.1-dev).
* **Resolution-dependent shift.** The scheduler's sigmas are warped by ``e^mu / (e^mu + 1/s - 1)`` with
  ``mu`` linear in the image token count (`FluxBackbone.mu`, ``calculate_shift`` of FluxPipeline; 1.15 at
  1024 px). That is SD3's shift ``k s / (1 + (k - 1) s)`` with ``k = e^mu``, so DMD's timestep draws are
  warped with the ``k`` of the training resolution, and sampling uses FluxPipeline's sigmas
  ``linspace(1, 1/steps, steps)`` shifted by the ``mu`` of the image size.
* **Guidance.** FLUX.1-dev is guidance-distilled: classifier-free guidance at scale g was distilled into an
  embedding of g, so one pass with ``guidance = g`` stands for CFG's two (FluxPipeline's ``guidance_scale``,
  3.5 by default). The conditioning carries it as ``cond["guidance"]`` (one value per sample). In DMD2:

  - the **real score** is one pass at ``guidance = real_guidance_scale`` (`FluxBackbone.guided_predict`),
    not two-pass CFG with the "" prompt: the teacher was trained to give its guided score that way, and
    never to be combined with an unconditional pass (it has no unguided mode to subtract);
  - the **student** and the **fake score** get the fixed ``guidance`` (`FluxBackbone.guidance`, 3.5). The
    student starts as the teacher at that guidance, the closest start to the guided target, and a stock
    FluxPipeline at its default ``guidance_scale`` samples it as trained. The fake score models the
    student's samples and starts as the teacher at the student's own guidance: DMD2 starts its fake score as
    the teacher model the generator starts from (the unguided conditional UNet), and this is its analogue.
    With ``real_guidance_scale`` equal to it (the shipped recipes) the DMD gradient starts at zero and grows
    as the fake score learns the student's few-step samples.

  A Flux checkpoint without the guidance embedding (``guidance_embeds: false``, e.g. FLUX.1-schnell) takes no
  guidance: its real score falls back to two-pass CFG (`Backbone.guided_predict`).
* **GAN head.** D reads the image tokens of the last double-stream block: 19 double-stream blocks (two
  streams each) and 38 single-stream ones make it the middle of the network by depth and by parameters
  (DMD2's UNets: the mid block; DMD2 has no Flux model, so this is our choice).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
from torch import nn

from .base import Cond, _check_source, _load, _meta_empty, _token_ids
from .dits import SD3Backbone

FLUX_DEFAULT_SIDE = 128
"""FluxPipeline's ``default_sample_size``: 128 latents per side, 1024 px (used when the VAE config has none)."""


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> Flux's packed tokens (B, h/2 * w/2, 4C), FluxPipeline's ``_pack_latents`` layout
    (token (i, j) holds channels c of the 2x2 patch at rows 2i, 2i+1 and columns 2j, 2j+1, as c*4 + 2*di + dj)."""
    B, C, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs latents into 2x2 patches: the latent side must be even, got {h}x{w} "
                         "(image sizes must be multiples of 2x the VAE factor, 16 px for FLUX.1)")
    return x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: tokens (B, h/2 * w/2, 4C) -> latents (B, C, h, w)."""
    B, _, c4 = tokens.shape
    return tokens.reshape(B, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, c4 // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of the packed tokens of an h x w latent: (0, row, column) per token, in
    `pack_latents`' order (FluxPipeline's ``_prepare_latent_image_ids``)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


class FluxBackbone(SD3Backbone):
    """FLUX.1: FluxTransformer2DModel, CLIPTextModel (pooled) + T5EncoderModel, AutoencoderKL, rectified flow
    with resolution-dependent shift and an embedded guidance scale (see the module docstring)."""

    kind = "flux"
    flow = True
    distillable = True
    prediction_type = "flow"

    denoiser_subfolder = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    default_max_sequence_length = 512

    guidance: float = 3.5
    """The embedded guidance of the conditioning `encode_prompts` returns: what the student, the fake score,
    D and fine-tuning run at (FluxPipeline's default ``guidance_scale``). The real score overrides it with
    ``real_guidance_scale`` (`guided_predict`); sampling with ``guidance_scale`` (`sample`)."""

    def __init__(self, *a, max_sequence_length: int = 512, **kw):
        if max_sequence_length > 512:  # FluxPipeline refuses it too: T5 was trained to 512 tokens here
            raise ValueError(f"Flux's T5 prompt length is at most 512 tokens, got max_sequence_length "
                             f"{max_sequence_length}")
        super().__init__(*a, max_sequence_length=max_sequence_length, **kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_sequence_length: int | None = None, **_) -> FluxBackbone:
        """Load ``transformer``, ``text_encoder`` (CLIP), ``text_encoder_2`` (T5), both tokenizers, ``scheduler``
        and ``vae`` subfolders of a FluxPipeline folder (or hub id, e.g. black-forest-labs/FLUX.1-dev)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = _check_source(path)
        return cls.from_parts(_load(FluxTransformer2DModel, path, "transformer"),
                              [_load(CLIPTextModel, path, "text_encoder"), _load(T5EncoderModel, path, "text_encoder_2")],
                              [_load(AutoTokenizer, path, "tokenizer"), _load(AutoTokenizer, path, "tokenizer_2")],
                              _load(AutoencoderKL, path, "vae"), _load(FlowMatchEulerDiscreteScheduler, path, "scheduler"),
                              path, max_sequence_length)

    # ------------------------------------------------------------------ shapes
    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels: the transformer's input is 4x that (2x2 patches)."""
        return self.denoiser.config.in_channels // 4

    @property
    def latent_size(self) -> int:
        """The native latent side: the VAE config's ``sample_size`` (1024 px for FLUX.1-dev, 128 latents), as
        FluxTransformer2DModel's config has none (FluxPipeline's ``default_sample_size`` is 128)."""
        side = getattr(self.vae.config, "sample_size", None) if self.vae is not None else None
        return side // self.vae_scale if isinstance(side, int) else FLUX_DEFAULT_SIDE

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer embeds a guidance scale (FLUX.1-dev) or not (FLUX.1-schnell)."""
        return bool(self.denoiser.config.guidance_embeds)

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """T5 states as ``encoder_hidden_states``, CLIP's pooled output as ``pooled_projections`` (FluxPipeline's
        ``encode_prompt``), and ``guidance`` (`guidance`, one per prompt)."""
        prompts = list(prompts)
        clip = self.text_encoders[0](_token_ids(self.tokenizers[0], prompts, self.device), output_hidden_states=False)
        t5_ids = _token_ids(self.tokenizers[1], prompts, self.device, self.max_sequence_length)
        states = self.text_encoders[1](t5_ids, output_hidden_states=False)[0]
        return {"encoder_hidden_states": states, "pooled_projections": clip.pooler_output,
                "guidance": torch.full((len(prompts),), float(self.guidance), device=self.device)}

    def meta_cond(self, batch: int, dtype: torch.dtype) -> Cond:
        """Meta conditioning of ``batch`` prompts: T5 tokens at the joint width, CLIP's pooled output, guidance."""
        cfg = self.denoiser.config
        return {"encoder_hidden_states": _meta_empty((batch, self.max_sequence_length, cfg.joint_attention_dim), dtype),
                "pooled_projections": _meta_empty((batch, cfg.pooled_projection_dim), dtype),
                "guidance": _meta_empty((batch,), dtype)}

    # ------------------------------------------------------------------ the denoiser
    def predict(self, x_t, t, cond, denoiser=None):
        """The velocity (B, C, h, w) at per-sample ``t = sigma * 1000``, through the packed transformer."""
        denoiser = denoiser or self.denoiser
        h, w = x_t.shape[-2:]
        states = cond["encoder_hidden_states"]
        guidance = cond.get("guidance") if denoiser.config.guidance_embeds else None
        out = denoiser(hidden_states=pack_latents(x_t), timestep=t.float().to(x_t.device) / self.num_timesteps,
                       guidance=guidance, pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
                       txt_ids=torch.zeros(states.shape[1], 3, device=x_t.device), img_ids=image_ids(h, w, x_t.device),
                       return_dict=False)[0]
        return unpack_latents(out, h, w)

    def guided_predict(self, x_t, t, cond, uncond, guidance_scale, denoiser=None):
        """DMD2's real score for a guidance-distilled Flux: ONE pass with the embedded ``guidance =
        guidance_scale`` in place of the conditioning's own (the module docstring says why); ``uncond`` is
        unused. Without a guidance embedding, two-pass CFG (`Backbone.guided_predict`)."""
        if not self.guidance_distilled:
            return super().guided_predict(x_t, t, cond, uncond, guidance_scale, denoiser)
        guided = {**cond, "guidance": torch.full_like(cond["guidance"], float(guidance_scale))}
        return self.predict(x_t, t, guided, denoiser)

    # ------------------------------------------------------------------ the shift
    def mu(self, side: int | None = None) -> float:
        """The shift exponent for ``side`` x ``side`` latents (default the native `latent_size`): linear in the
        image token count ``(side / 2)^2`` through the scheduler's (base_image_seq_len, base_shift) and
        (max_image_seq_len, max_shift), FluxPipeline's ``calculate_shift`` (0.5 at 256 tokens, 1.15 at 4096)."""
        cfg = self.scheduler.config
        tokens = ((side or self.latent_size) // 2) ** 2
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        m = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (hi - lo)
        return tokens * m + cfg.get("base_shift", 0.5) - m * lo

    def _shift_factor(self, side: int | None = None) -> float:
        """k of the warp ``k s / (1 + (k - 1) s)``: ``e^mu`` for the scheduler's exponential time shift (Flux),
        ``mu`` for the linear one; the fixed ``shift`` without dynamic shifting."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.get("shift", 1.0) or 1.0)
        mu = self.mu(side)
        return mu if cfg.get("time_shift_type", "exponential") == "linear" else math.exp(mu)

    def shift_timesteps(self, t):
        """Flux's resolution-dependent shift at the native size (DMD2 trains at it): the scheduler's own warp of
        its sigmas, ``e^mu / (e^mu + 1/s - 1)``, written as ``k s / (1 + (k - 1) s)`` with ``k = e^mu`` so that
        s = 0 stays finite; distillation draws its DMD and fake-score timesteps through it."""
        k = self._shift_factor()
        s = t.float() / self.num_timesteps
        return k * s / (1 + (k - 1) * s) * self.num_timesteps

    # ------------------------------------------------------------------ sampling
    def set_sampling_timesteps(self, scheduler, steps: int, side: int, device) -> None:
        """FluxPipeline's grid: sigmas ``linspace(1, 1/steps, steps)``, shifted by the scheduler with the ``mu``
        of a ``side`` x ``side`` latent."""
        import numpy as np

        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self.mu(side), device=device)

    @contextmanager
    def embedded_guidance(self, value: float):
        """Run the block with `guidance` set to ``value`` (the conditioning encoded inside carries it)."""
        saved = self.guidance
        self.guidance = float(value)
        try:
            yield
        finally:
            self.guidance = saved

    @torch.no_grad()
    def sample(self, prompts, tsm=None, steps: int = 28, guidance_scale: float = 3.5, generator=None, size=None,
               reencode_prompts: bool = False, noise=None, scheduler=None) -> torch.Tensor:
        """`Backbone.sample` as FluxPipeline samples: ``guidance_scale`` is the embedded guidance (one pass per
        step), not CFG, for a guidance-distilled model; the default size is the native one (1024 px)."""
        size = size or self.latent_size * self.vae_scale
        if not self.guidance_distilled:
            return super().sample(prompts, tsm, steps, guidance_scale, generator, size, reencode_prompts, noise,
                                  scheduler)
        with self.embedded_guidance(guidance_scale):
            return super().sample(prompts, tsm, steps, 1.0, generator, size, reencode_prompts, noise, scheduler)

    # ------------------------------------------------------------------ the GAN head's input
    def bottleneck(self, denoiser: nn.Module) -> nn.Module:
        """The last double-stream block: the middle of Flux by depth and parameters (module docstring)."""
        return denoiser.transformer_blocks[-1]

    def bottleneck_features(self, output, x_t):
        """The block returns (text tokens, image tokens); the image tokens (B, h/2 * w/2, D) as (B, D, h/2, w/2)."""
        tokens = output[1]
        h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def bottleneck_size(self) -> tuple[int, int]:
        """(width, side) of `bottleneck_features` at the native size: the inner width, one token per 2x2 patch."""
        cfg = self.denoiser.config
        return cfg.num_attention_heads * cfg.attention_head_dim, max(1, self.latent_size // 2)
