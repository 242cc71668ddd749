"""Load the teacher (an SD1.5-family pipeline folder or hub id) into its parts.

The teacher gives the three DMD2 models their weights: the frozen *real* score, the trainable *fake*
score (a copy) and the *generator* (the teacher plus TSM experts). Pixel-space pipelines without a
VAE (the embedded Fashion-MNIST teacher) work too: encode/decode are then the identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .schedule import NoiseSchedule


@dataclass
class Teacher:
    """The parts of a text-to-image teacher that distillation needs."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    vae: nn.Module | None
    schedule: NoiseSchedule

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def latent_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP hidden states (B, L, D) for a list of prompts (the frozen text encoder, no grad)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model space (scaled VAE latents, or the images themselves)."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.clamp(-1, 1)

    def to(self, device, dtype: torch.dtype | None = None) -> Teacher:
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)
        return self


def _model_index(path: str) -> dict:
    local = Path(path)
    if local.is_dir():
        f = local / "model_index.json"
        if not f.exists():
            raise FileNotFoundError(f"{local} has no model_index.json: it is not a diffusers pipeline folder")
        return json.loads(f.read_text())
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path)
    except Exception as e:  # offline, typo, or no access: one clear message instead of a hub traceback
        raise FileNotFoundError(
            f"teacher {path!r} is neither a local pipeline folder nor a reachable hub id ({type(e).__name__}: {e}). "
            "Download it once with `huggingface-cli download <id> --local-dir DIR` and pass DIR."
        ) from e


def load_teacher(path: str | Path) -> Teacher:
    """Load UNet, CLIP text encoder, tokenizer, scheduler and (if present) VAE with ``from_pretrained``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(path)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"teacher path {path!r} does not exist (and is not a hub id like 'org/name')")
    index = _model_index(path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    # DDPM arithmetic for any SD scheduler config (PNDM/DDIM/Euler share betas and prediction type).
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    has_vae = isinstance(index.get("vae"), list) and index["vae"][0] is not None
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae") if has_vae else None
    for m in (unet, text_encoder, vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return Teacher(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                   schedule=NoiseSchedule.from_scheduler(scheduler))
