"""Transformer (DiT) families (`tsm_core.models.base.Backbone`), each registered in `tsm_core.models.registry`:

- ``"pixart"``: PixArt-alpha (PixArtTransformer2DModel + T5 encoder), DDPM noise, epsilon target;
  the learned-variance half of the output is dropped, as in diffusers' PixArt LoRA scripts.
- ``"sd3"``: SD3 (SD3Transformer2DModel + two CLIPTextModelWithProjection + optional T5), rectified
  flow ``x_t = (1 - s) x0 + s noise`` with target ``noise - x0``. The timestep is ``t = s * 1000``,
  a float in ``[0, 1000]``, which is what the transformer and the TSM intervals receive.
"""

from __future__ import annotations

import os

import torch
from torch import nn

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
from .unets import UNetBackbone


class PixArtBackbone(UNetBackbone):
    """PixArt-alpha: PixArtTransformer2DModel + T5 encoder, DDPM noise, epsilon target."""

    kind = "pixart"
    distillable = False
    denoiser_subfolder = "transformer"
    denoiser_class = "PixArtTransformer2DModel"
    default_max_sequence_length = 120

    def __init__(self, *a, max_sequence_length: int = 120, **kw):
        super().__init__(*a, **kw)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_sequence_length: int | None = None, **_) -> PixArtBackbone:
        """Load ``transformer``, ``text_encoder`` (T5), ``tokenizer``, ``scheduler`` and ``vae`` subfolders."""
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        path = _check_source(path)
        return cls.from_parts(_load(PixArtTransformer2DModel, path, "transformer"),
                              [_load(T5EncoderModel, path, "text_encoder")], [_load(AutoTokenizer, path, "tokenizer")],
                              _load(AutoencoderKL, path, "vae"), _load(DDPMScheduler, path, "scheduler"), path,
                              max_sequence_length)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        tok, te = self.tokenizers[0], self.text_encoders[0]
        enc = tok(list(prompts), padding="max_length", max_length=self.max_sequence_length, truncation=True,
                  return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        return {"encoder_hidden_states": te(ids, attention_mask=mask)[0], "encoder_attention_mask": mask}

    def predict(self, x_t, t, cond, denoiser=None):
        out = (denoiser or self.denoiser)(x_t, encoder_hidden_states=cond["encoder_hidden_states"],
                            encoder_attention_mask=cond["encoder_attention_mask"], timestep=t.to(x_t.device),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        c = x_t.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out  # drop the learned-variance channels


# ----------------------------------------------------------------------------- SD3 (MM-DiT)


class SD3Backbone(Backbone):
    """SD3: SD3Transformer2DModel, two CLIP encoders with projection, optional T5; rectified flow."""

    kind = "sd3"
    flow = True
    distillable = True
    prediction_type = "flow"

    denoiser_subfolder = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    default_max_sequence_length = 256

    def __init__(self, *a, max_sequence_length: int = 256, **kw):
        super().__init__(*a, **kw)
        self.max_sequence_length = max_sequence_length
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)

    def meta_cond(self, batch: int, dtype: torch.dtype) -> Cond:
        """Meta conditioning of ``batch`` prompts: CLIP tokens then T5 tokens at the joint width, and both
        CLIPs' pooled outputs."""
        encoders = self.text_encoders
        tokens = encoders[0].config.max_position_embeddings
        return {"encoder_hidden_states": _meta_empty((batch, tokens + self.max_sequence_length,
                                                      self.denoiser.config.joint_attention_dim), dtype),
                "pooled_projections": _meta_empty((batch, sum(e.config.projection_dim for e in encoders[:2])), dtype)}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_sequence_length: int | None = None, **_) -> SD3Backbone:
        """Load ``transformer``, ``text_encoder``/``_2`` (CLIP), optional ``text_encoder_3`` (T5), tokenizers,
        ``scheduler`` and ``vae`` subfolders."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        path = _check_source(path)
        tes = [_load(CLIPTextModelWithProjection, path, "text_encoder"),
               _load(CLIPTextModelWithProjection, path, "text_encoder_2")]
        toks = [_load(AutoTokenizer, path, "tokenizer"), _load(AutoTokenizer, path, "tokenizer_2")]
        if pipeline_has_component(path, "text_encoder_3"):
            tes.append(_load(T5EncoderModel, path, "text_encoder_3"))
            toks.append(_load(AutoTokenizer, path, "tokenizer_3"))
        return cls.from_parts(_load(SD3Transformer2DModel, path, "transformer"), tes, toks,
                              _load(AutoencoderKL, path, "vae"), _load(FlowMatchEulerDiscreteScheduler, path, "scheduler"),
                              path, max_sequence_length)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        prompts = list(prompts)
        outs = _clip_outputs(self.tokenizers[:2], self.text_encoders[:2], prompts, self.device)
        clip = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)  # the penultimate layer, as SD3 was trained
        pooled = [out.text_embeds for out in outs]
        joint = self.denoiser.config.joint_attention_dim
        clip = nn.functional.pad(clip, (0, joint - clip.shape[-1]))
        if len(self.text_encoders) == 3:
            t5 = self.text_encoders[2](_token_ids(self.tokenizers[2], prompts, self.device, self.max_sequence_length))[0]
        else:  # no T5: zeros, as diffusers' SD3 pipeline does
            t5 = torch.zeros(len(prompts), self.max_sequence_length, joint, device=self.device, dtype=clip.dtype)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def sample_timesteps(self, batch, lo=0, hi=None, generator=None):
        """Continuous ``t = sigma * T`` uniform in ``[lo, hi)`` (floats, routed onto the same intervals)."""
        hi = self.num_timesteps if hi is None else hi
        if not 0 <= lo < hi <= self.num_timesteps:
            raise ValueError(f"timestep range [{lo}, {hi}) must lie inside [0, {self.num_timesteps})")
        u = torch.rand(batch, generator=generator)
        return (lo + u * (hi - lo)).clamp(max=hi - 1e-3)

    def _sigma(self, t, x):
        return (t.float() / self.num_timesteps).to(x.device).view(-1, *([1] * (x.ndim - 1)))

    def add_noise(self, x0, noise, t):
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def to_x0(self, x_t, output, t):
        # x_t = (1 - s) x0 + s noise and v = noise - x0 give x0 = x_t - s v.
        return x_t - self._sigma(t, x_t) * output

    def predict(self, x_t, t, cond, denoiser=None):
        return (denoiser or self.denoiser)(hidden_states=x_t, timestep=t.float().to(x_t.device),
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"]).sample

    timestep_dtype = torch.float32

    def shift_timesteps(self, t):
        """SD3's timestep shift on ``t = sigma * T``: ``sigma' = k sigma / (1 + (k - 1) sigma)`` with the
        scheduler's ``shift`` k (3.0 for SD3), the warp its Euler sampler applies to its sigmas; distillation
        draws its DMD and fake-score timesteps through it, so they follow the teacher's own sigmas."""
        k = float(getattr(self.scheduler.config, "shift", 1.0) or 1.0)
        s = t.float() / self.num_timesteps
        return k * s / (1 + (k - 1) * s) * self.num_timesteps

    def bottleneck(self, denoiser):
        """The middle joint block (an MM-DiT has no mid block): D reads its image tokens."""
        return denoiser.transformer_blocks[(len(denoiser.transformer_blocks) - 1) // 2]

    def bottleneck_features(self, output, x_t):
        """The block returns (text tokens, image tokens); the image tokens (B, h*w, D) as a map (B, D, h, w)."""
        tokens = output[1]
        p = self.denoiser.config.patch_size
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def sampling_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)


# ----------------------------------------------------------------------------- video UNets
