"""The `Backbone` interface every diffusion model family implements, and the conditioning helpers.

A `Backbone` hides how a model family encodes prompts, noises its inputs and computes its training
target, so one trainer (and one sampler) serves every family. The families live beside this module
(`tsm_core.models.unets`: SD1.x/2.x, SDXL, video UNets; `tsm_core.models.dits`: PixArt-alpha, SD3) and
are listed once, in `tsm_core.models.registry`.

Everything loads with ``from_pretrained(path_or_hub_id, subfolder=...)``; nothing else downloads.
The DMD2 trainer reuses these backbones: it only needs ``denoiser``, ``encode_prompts``,
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
    """The recipes' ``model.kind`` (`tsm_core.models.registry`)."""
    flow: bool = False
    """Rectified-flow family (timesteps ``t = sigma * T``, student steps given as sigmas); else DDPM."""
    distillable: bool = False
    """Whether DMD2 distillation (its trainer and planner) supports this family as a teacher."""
    video: bool = False
    """Samples are videos ``(B, C, F, h, w)``."""
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

    def guided_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, guidance_scale: float,
                       denoiser: nn.Module | None = None) -> torch.Tensor:
        """The output under the family's guidance at ``guidance_scale`` (DMD2's real score): classifier-free
        guidance, ``u + g (c - u)`` over one pass of 2B rows with ``uncond`` (the one-row unconditional input)
        repeated; at 1 the plain conditional pass. Guidance-distilled families (Flux) embed the scale instead."""
        if guidance_scale == 1.0:
            return self.predict(x_t, t, cond, denoiser)
        n = x_t.shape[0]
        both = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond([cond, expand_cond(uncond, n)]), denoiser)
        out_c, out_u = both.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

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

    def bottleneck_size(self) -> tuple[int, int]:
        """(channels, side) of `bottleneck_features` at the native `latent_size`, from the config alone (the GAN
        head is sized from it before any pass, on the meta device too): a UNet's last block width at
        latent_size / 2^(levels - 1), a transformer's width at latent_size / patch_size."""
        cfg = self.denoiser.config
        if hasattr(cfg, "block_out_channels"):
            return cfg.block_out_channels[-1], max(1, self.latent_size // 2 ** (len(cfg.block_out_channels) - 1))
        return cfg.num_attention_heads * cfg.attention_head_dim, max(1, self.latent_size // cfg.patch_size)

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

    def set_sampling_timesteps(self, scheduler, steps: int, side: int, device) -> None:
        """Set ``steps`` inference timesteps on a sampling scheduler for ``side`` x ``side`` model-space samples
        (the scheduler's own spacing; Flux shifts it by the image size)."""
        scheduler.set_timesteps(steps, device=device)

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
        self.set_sampling_timesteps(scheduler, steps, size // self.vae_scale, device)
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

    # ------------------------------------------------------------------ meta build (the memory planner)
    denoiser_subfolder: str = "unet"
    """The pipeline folder's denoiser component (``transformer`` for DiTs)."""
    denoiser_class: str = "UNet2DConditionModel"
    """The diffusers class of the denoiser."""
    scheduler_class: str = "DDPMScheduler"
    """The diffusers class of the training noise scheduler."""
    default_max_sequence_length: int | None = None
    """Families with a T5 encoder: its prompt length when the recipe gives none (PixArt 120, SD3 256)."""

    @classmethod
    def meta(cls, path: str | os.PathLike, max_sequence_length: int | None = None) -> Backbone:
        """This family's backbone built from a pipeline folder's config files on the meta device: every
        tensor has its real shape and dtype, no weight file is opened (what ``tsm-distill --plan`` measures).
        The text encoders are the classes ``model_index.json`` names, as diffusers would load them.

        Raises:
            FileNotFoundError: the folder lacks ``model_index.json`` or a listed component's ``config.json``.
        """
        import diffusers
        import transformers
        from accelerate import init_empty_weights

        path = Path(path)
        missing = [f for f in (path / "model_index.json", path / cls.denoiser_subfolder / "config.json")
                   if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} does not exist: a meta build needs a local pipeline folder with at "
                                    "least model_index.json and the config.json files (no weights), e.g. "
                                    "`huggingface-cli download REPO --include '*.json' '*.txt'`")
        denoiser_cls = getattr(diffusers, cls.denoiser_class)
        with init_empty_weights(include_buffers=True):  # SD3's positional table is a buffer the passes read
            denoiser = denoiser_cls.from_config(denoiser_cls.load_config(path / cls.denoiser_subfolder))
        with init_empty_weights():
            texts = []
            for folder, name in _text_encoder_classes(path):
                if not (path / folder / "config.json").is_file():
                    raise FileNotFoundError(f"model_index.json lists {folder} ({name}) but "
                                            f"{path / folder / 'config.json'} does not exist; download the config "
                                            "files of every component")
                texts.append(getattr(transformers, name)(transformers.AutoConfig.from_pretrained(path / folder)))
            vae = (diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(path / "vae"))
                   if (path / "vae" / "config.json").is_file() else None)
        for encoder in texts:
            encoder.tie_weights()  # T5's input embedding is its shared one: count it once (not inside the meta context)
        sched_cls = getattr(diffusers, cls.scheduler_class)
        scheduler = sched_cls.from_config(sched_cls.load_config(path / "scheduler"))
        return cls.from_parts(denoiser, texts, [None] * len(texts), vae, scheduler, str(path), max_sequence_length)

    @classmethod
    def from_parts(cls, denoiser: nn.Module, text_encoders: list[nn.Module], tokenizers: list[Any],
                   vae: nn.Module | None, scheduler: Any, path: str = "",
                   max_sequence_length: int | None = None) -> Backbone:
        """The backbone of already built components (``from_pretrained`` and `meta` end here); families with a
        T5 prompt length (``default_max_sequence_length`` set) take ``max_sequence_length``, else that default."""
        kw = ({} if cls.default_max_sequence_length is None
              else {"max_sequence_length": max_sequence_length or cls.default_max_sequence_length})
        return cls(denoiser, text_encoders, tokenizers, vae, scheduler, path=path, **kw)

    def meta_cond(self, batch: int, dtype: torch.dtype) -> Cond:
        """Meta tensors shaped like ``encode_prompts`` of ``batch`` prompts (no tokenizer needed): one CLIP-style
        ``encoder_hidden_states`` at the summed width of the text encoders. Families with other
        conditioning override it."""
        encoders = self.text_encoders
        tokens = encoders[0].config.max_position_embeddings
        return {"encoder_hidden_states": _meta_empty((batch, tokens, sum(e.config.hidden_size for e in encoders)),
                                                     dtype)}


def _meta_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _text_encoder_classes(path: Path) -> list[tuple[str, str]]:
    """(folder, transformers class name) of every text encoder ``model_index.json`` lists, in pipeline order
    (``text_encoder``, ``text_encoder_2``, ...); a null entry (SD3 without its T5) is skipped."""
    import json

    index = json.loads((path / "model_index.json").read_text())
    names = sorted((k for k in index if k == "text_encoder" or k.startswith("text_encoder_")),
                   key=lambda k: int(k.rsplit("_", 1)[1]) if k != "text_encoder" else 1)
    return [(k, index[k][1]) for k in names if isinstance(index[k], list) and index[k][1] is not None]
