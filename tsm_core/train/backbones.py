"""Diffusion backbones behind one interface, so one trainer (and one sampler) serves every family.

A `Backbone` hides how a model family encodes prompts, noises its inputs and computes its training
target:

- ``"unet"``: Stable Diffusion 1.x / 2.x folders (UNet2DConditionModel + CLIP text encoder), DDPM
  noise, epsilon or v prediction (read from the scheduler config). Pixel-space pipelines without a
  VAE (the embedded Fashion-MNIST teacher) work too: `Backbone.vae_encode` is then the identity.
- ``"sdxl"``: SDXL folders (the UNet with ``text_time`` micro-conditioning, two CLIP text encoders),
  DDPM noise, epsilon or v prediction.
- ``"pixart"``: PixArt-alpha (PixArtTransformer2DModel + T5 encoder), DDPM noise, epsilon target;
  the learned-variance half of the output is dropped, as in diffusers' PixArt LoRA scripts.
- ``"sd3"``: SD3 (SD3Transformer2DModel + two CLIPTextModelWithProjection + optional T5), rectified
  flow ``x_t = (1 - s) x0 + s noise`` with target ``noise - x0``. The timestep is ``t = s * 1000``,
  a float in ``[0, 1000]``, which is what the transformer and the TSM intervals receive.
- ``"unet3d"``: text-to-video UNets, ModelScope / zeroscope (UNet3DConditionModel + CLIP; the
  spatial-plus-temporal 3D UNet design VideoCrafter2 shares), DDPM noise. Samples are videos
  ``(B, C, F, h, w)``; the VAE encodes and decodes them frame by frame.
- ``"animatediff"``: AnimateDiff's UNetMotionModel (an SD UNet with motion modules), the same way; its
  text states are repeated per frame, as AnimateDiff's pipeline does.

Everything loads with ``from_pretrained(path_or_hub_id, subfolder=...)``; nothing else downloads.
The DMD2 trainer can reuse the UNet backbone: it only needs ``denoiser``, ``encode_prompts``,
``add_noise``, ``predict`` and the scheduler.

    bb = load_backbone("unet", "path/to/sd15")
    cond = bb.encode_prompts(["a photo of a cat"])
    x0 = bb.vae_encode(pixels)
    t = bb.sample_timesteps(len(x0), 0, 1000)
    noise = torch.randn_like(x0)
    loss = F.mse_loss(bb.predict(bb.add_noise(x0, noise, t), t, cond), bb.target(x0, noise, t))
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsm_core.routing import route_by_timestep  # noqa: F401  (re-exported: samplers use it)
from tsm_core.train.schedule import NoiseSchedule

KINDS = ("unet", "sdxl", "pixart", "sd3", "unet3d", "animatediff")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")

Cond = dict[str, torch.Tensor]


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenate prompt conditionings (dicts of batch-first tensors) along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expand_cond(cond: Cond, n: int) -> Cond:
    """A one-prompt conditioning (e.g. CFG's unconditional row) repeated for a batch of ``n``."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def cond_map(cond: Cond, fn) -> Cond:
    """Apply ``fn`` to every tensor of a conditioning (a dtype or device change)."""
    return {k: fn(v) for k, v in cond.items()}


def _token_ids(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    """Prompt token ids padded (and truncated) to ``max_length`` (default: the tokenizer's own)."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def _clip_outputs(tokenizers, encoders, prompts: list[str], device) -> list:
    """Every CLIP text encoder's output on ``prompts``, with all hidden states (SDXL and SD3 read the
    penultimate layer of each, and the pooled projections)."""
    return [te(_token_ids(tok, prompts, device), output_hidden_states=True) for tok, te in zip(tokenizers, encoders)]


def _check_source(path: str | os.PathLike) -> str:
    """Local folders must exist; hub ids ("org/name") pass through to ``from_pretrained``."""
    text = os.fspath(path)
    if Path(text).exists():
        return text
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return text
    raise FileNotFoundError(f"model folder not found: {text!r}; give a diffusers pipeline folder "
                            f"(with model_index.json) or a hub id like 'org/name'")


def _load(cls, path: str, subfolder: str, **kw):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kw)
    except OSError as e:
        raise FileNotFoundError(f"could not load {cls.__name__} from {path!r}/{subfolder}: {e}. Is it a "
                                f"complete pipeline folder? Downloads are impossible offline.") from e


def pipeline_has_component(path: str | os.PathLike, name: str) -> bool:
    """Whether the pipeline's model_index.json names a component ``name`` (False when it is null), e.g.
    ``"vae"`` (pixel-space pipelines have none) or SD3's ``"text_encoder_3"``."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(path)
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and entry[0] is not None


class Backbone:
    """One diffusion model family: denoiser, text encoder(s), tokenizer(s), optional VAE, scheduler.

    Subclasses implement `encode_prompts`, `predict`, `add_noise`, `target`, `sample_timesteps`
    and `sampling_scheduler`. Attributes:

    - ``denoiser``: the UNet / transformer (attach TSM here);
    - ``text_encoders``: list of text encoders (attach text-encoder experts here);
    - ``vae``: AutoencoderKL or None (pixel space);
    - ``scheduler``: the noise scheduler used for training (DDPM or flow matching);
    - ``num_timesteps``: T (1000), the range the TSM intervals split.
    """

    kind: str = ""
    num_timesteps: int = 1000
    prediction_type: str = "epsilon"

    def __init__(self, denoiser: nn.Module, text_encoders: list[nn.Module], tokenizers: list[Any],
                 vae: nn.Module | None, scheduler: Any, path: str = ""):
        self.denoiser = denoiser
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.vae = vae
        self.scheduler = scheduler
        self.path = path
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()

    # ------------------------------------------------------------------ modules
    def modules(self) -> list[nn.Module]:
        """Every network of the backbone (denoiser, text encoders, VAE)."""
        return [m for m in (self.denoiser, *self.text_encoders, self.vae) if m is not None]

    def to(self, device, dtype: torch.dtype | None = None) -> Backbone:
        """Move every network to ``device`` (and the frozen VAE / text encoders to ``dtype``)."""
        for m in self.modules():
            m.to(device)
        if dtype is not None and self.vae is not None:
            self.vae.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def enable_gradient_checkpointing(self, text_encoders: bool = False) -> None:
        """Turn on activation checkpointing in the denoiser (and the text encoders when asked)."""
        self.denoiser.enable_gradient_checkpointing()
        if text_encoders:
            for te in self.text_encoders:
                te.gradient_checkpointing_enable()

    # ------------------------------------------------------------------ latents
    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def vae_scale(self) -> int:
        """How many pixels one latent covers per side (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def vae_encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> model inputs (scaled latents; the pixels themselves without a VAE).

        With ``generator=None`` the latent is the distribution mean (deterministic, used for caching).
        """
        if self.vae is None:
            return pixels
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            z = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model inputs -> pixels in [-1, 1] (identity without a VAE)."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        with torch.no_grad():
            return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    # ------------------------------------------------------------------ diffusion
    def sample_timesteps(self, batch: int, lo: int = 0, hi: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform training timesteps in ``[lo, hi)`` (default the whole ``[0, T)``), one per sample."""
        hi = self.num_timesteps if hi is None else hi
        if not 0 <= lo < hi <= self.num_timesteps:
            raise ValueError(f"timestep range [{lo}, {hi}) must lie inside [0, {self.num_timesteps})")
        return torch.randint(lo, hi, (batch,), generator=generator)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Prompts -> conditioning dict passed to `predict` (gradients flow when encoders train)."""
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, denoiser: nn.Module | None = None) -> torch.Tensor:
        """The denoiser's output in the parameterisation of `target`. ``denoiser`` defaults to the
        backbone's own; distillation passes its fake score (a copy of the denoiser) through the same call."""
        raise NotImplementedError

    # Distillation (DMD2) needs three more facts of a family: the timestep dtype its denoiser takes, how
    # its training timesteps are warped (SD3's shift), and where its bottleneck features are for D.
    timestep_dtype: torch.dtype = torch.long

    def shift_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Warp uniformly drawn timesteps to the family's training distribution (identity for DDPM)."""
        return t

    def bottleneck(self, denoiser: nn.Module) -> nn.Module:
        """The module whose output D (the GAN head) reads: the UNet's mid block (DMD2)."""
        return denoiser.mid_block

    def bottleneck_features(self, output, x_t: torch.Tensor) -> torch.Tensor:
        """The `bottleneck` module's output as a feature map (B, C, h, w)."""
        return output

    def unconditional(self) -> Cond:
        """One row of the conditioning classifier-free guidance pairs with the prompts (`as_unconditional`
        of the encoding of "")."""
        return self.as_unconditional(self.encode_prompts([""]))

    def as_unconditional(self, cond: Cond) -> Cond:
        """The encoding of "" rows turned into CFG's unconditional input: unchanged for SD1.5 and SD3, as
        DMD2 and diffusers' pipelines use it."""
        return cond

    @property
    def latent_size(self) -> int:
        """The denoiser's native sample size per side, in model space (latents, or pixels without a VAE)."""
        return self.denoiser.config.sample_size

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noisy input x_t at per-sample timesteps ``t``."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the diffusion loss."""
        raise NotImplementedError

    def to_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate from the denoiser's output (the inverse of `add_noise`/`target`)."""
        raise NotImplementedError

    def sampling_scheduler(self):
        """A fresh scheduler for inference (DDIM for DDPM models, the flow-matching Euler scheduler for SD3)."""
        raise NotImplementedError

    def noise_shape(self, n: int, side: int) -> tuple[int, ...]:
        """The shape of ``n`` samples' starting noise at ``side`` x ``side`` latents (images here)."""
        return (n, self.latent_channels, side, side)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], tsm=None, steps: int = 20, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, size: int | None = None,
               reencode_prompts: bool = False, noise: torch.Tensor | None = None,
               scheduler=None) -> torch.Tensor:
        """Generate images (B, 3, H, W) in [-1, 1] with the TSM experts switched per step.

        Every denoiser call runs inside ``tsm.timesteps(t)`` with the step's timestep, so stage-1
        experts switch per step and the stage-2 router sees t. ``reencode_prompts`` re-encodes the
        prompts under each step's timestep, needed when the text encoders carry experts too.
        ``guidance_scale > 1`` uses classifier-free guidance with the family's unconditional input
        (`as_unconditional` of the "" prompt, as training's real score).

        ``noise`` (one starting latent per prompt) replaces the draw from ``generator``, for callers
        that seed each image on its own; ``scheduler`` (not yet set) replaces `sampling_scheduler`.
        """
        device = self.device
        n = len(prompts)
        size = size or self.denoiser.config.sample_size * self.vae_scale
        if size % self.vae_scale:
            raise ValueError(f"image size {size} must be a multiple of the VAE factor {self.vae_scale}")
        scheduler = scheduler or self.sampling_scheduler()
        scheduler.set_timesteps(steps, device=device)
        if noise is not None and len(noise) != n:
            raise ValueError(f"need one starting latent per prompt, got {len(noise)} for {n} prompts")
        x = (noise if noise is not None
             else torch.randn(self.noise_shape(n, size // self.vae_scale), generator=generator)).to(device)
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
        cfg = guidance_scale > 1.0
        texts = ([""] * n + list(prompts)) if cfg else list(prompts)

        def encode(t_batch):
            with (tsm.timesteps(t_batch) if (tsm is not None and reencode_prompts) else nullcontext()):
                cond = self.encode_prompts(texts)
            if not cfg:
                return cond
            # The "" rows as the family's unconditional input (SDXL: zeros), as training's real score uses it.
            return cat_cond([self.as_unconditional(cond_map(cond, lambda v: v[:n])), cond_map(cond, lambda v: v[n:])])

        cond = None if reencode_prompts else encode(None)
        for t in scheduler.timesteps:
            tb = t.reshape(1).expand(len(texts)).cpu()
            if reencode_prompts:
                cond = encode(tb)
            xin = torch.cat([x, x]) if cfg else x
            if hasattr(scheduler, "scale_model_input"):
                xin = scheduler.scale_model_input(xin, t)
            with (tsm.timesteps(tb) if tsm is not None else nullcontext()):
                out = self.predict(xin, tb.to(device), cond)
            if cfg:
                u, c = out.chunk(2)
                out = u + guidance_scale * (c - u)
            x = scheduler.step(out, t, x).prev_sample
        return self.vae_decode(x)


# ----------------------------------------------------------------------------- UNet (SD1.5 / SD2)


class UNetBackbone(Backbone):
    """Stable Diffusion 1.x/2.x: UNet2DConditionModel, CLIP text encoder, DDPM noise (eps or v)."""

    kind = "unet"
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


class PixArtBackbone(UNetBackbone):
    """PixArt-alpha: PixArtTransformer2DModel + T5 encoder, DDPM noise, epsilon target."""

    kind = "pixart"

    def __init__(self, *a, max_sequence_length: int = 120, **kw):
        super().__init__(*a, **kw)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_sequence_length: int | None = None, **_) -> PixArtBackbone:
        """Load ``transformer``, ``text_encoder`` (T5), ``tokenizer``, ``scheduler`` and ``vae`` subfolders."""
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        path = _check_source(path)
        return cls(_load(PixArtTransformer2DModel, path, "transformer"),
                   [_load(T5EncoderModel, path, "text_encoder")], [_load(AutoTokenizer, path, "tokenizer")],
                   _load(AutoencoderKL, path, "vae"), _load(DDPMScheduler, path, "scheduler"), path=path,
                   max_sequence_length=max_sequence_length or 120)

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
    prediction_type = "flow"

    def __init__(self, *a, max_sequence_length: int = 256, **kw):
        super().__init__(*a, **kw)
        self.max_sequence_length = max_sequence_length
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)

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
        return cls(_load(SD3Transformer2DModel, path, "transformer"), tes, toks, _load(AutoencoderKL, path, "vae"),
                   _load(FlowMatchEulerDiscreteScheduler, path, "scheduler"), path=path,
                   max_sequence_length=max_sequence_length or 256)

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


class VideoUNetBackbone(UNetBackbone):
    """Text-to-video 3D UNet (ModelScope / zeroscope): UNet3DConditionModel + CLIP, DDPM noise (eps or v).

    Samples are videos ``(B, C, F, h, w)`` (pixels ``(B, 3, F, H, W)`` in [-1, 1]); the noise schedule
    broadcasts over frames, so every frame of a video shares its timestep, and the TSM layers route
    the frames and pixels the UNet folds into its batch by their video (``RoutingState.rows``).
    ``num_frames`` is the length of sampled videos (the trainer sets it from ``data.num_frames``).
    """

    kind = "unet3d"
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


_CLASSES = {"unet": UNetBackbone, "sdxl": SDXLBackbone, "pixart": PixArtBackbone, "sd3": SD3Backbone, "unet3d": VideoUNetBackbone,
            "animatediff": MotionUNetBackbone}


def load_backbone(kind: str, path: str | os.PathLike, max_sequence_length: int | None = None) -> Backbone:
    """Load a diffusers pipeline folder (or hub id) as a `Backbone` of family ``kind``.

    Args:
        kind: "unet" (SD1.5 / SD2, also pixel-space pipelines without a VAE), "sdxl", "pixart", "sd3", or the
            video UNets "unet3d" (ModelScope / zeroscope) and "animatediff" (UNetMotionModel).
        path: the pipeline folder or hub id.
        max_sequence_length: T5 prompt length (PixArt default 120, SD3 default 256).

    Raises:
        ValueError: an unknown kind.
        FileNotFoundError: the folder (or one of its components) is missing.
    """
    if kind not in _CLASSES:
        raise ValueError(f"backbone kind must be one of {list(KINDS)}, got {kind!r}")
    return _CLASSES[kind].from_pretrained(path, max_sequence_length=max_sequence_length)
