"""The teacher (an SD1.5-family pipeline folder or hub id) as DMD2 needs it.

The teacher gives the three DMD2 models their weights: the frozen *real* score, the trainable *fake*
score (a copy) and the *generator* (the teacher plus TSM experts). Loading and prompt/VAE handling
are the shared UNet backbone's (``tsm_core.train.backbones``); this view adds the x0-space noise
arithmetic distillation works in. Pixel-space pipelines without a VAE (the embedded Fashion-MNIST
teacher) work too: encode/decode are then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tsm_core.train.backbones import UNetBackbone
from tsm_core.train.schedule import NoiseSchedule


@dataclass
class Teacher:
    """The parts of a text-to-image teacher that distillation needs."""

    backbone: UNetBackbone
    schedule: NoiseSchedule

    @property
    def unet(self) -> nn.Module:
        return self.backbone.denoiser

    @property
    def text_encoder(self) -> nn.Module:
        return self.backbone.text_encoders[0]

    @property
    def tokenizer(self):
        return self.backbone.tokenizers[0]

    @property
    def scheduler(self):
        return self.backbone.scheduler

    @property
    def vae(self) -> nn.Module | None:
        return self.backbone.vae

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def latent_size(self) -> int:
        return self.unet.config.sample_size

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP hidden states (B, L, D) for a list of prompts (the frozen text encoder, no grad)."""
        return self.backbone.encode_prompts(list(prompts))["encoder_hidden_states"]

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> model space (scaled VAE latents, or the images themselves).

        With a ``generator`` the latent is a sample of the VAE posterior (DMD2's real latents), without
        one its mean.
        """
        return self.backbone.vae_encode(images, generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1]."""
        return self.backbone.vae_decode(latents)

    def to(self, device, dtype: torch.dtype | None = None) -> Teacher:
        self.backbone.to(device, dtype)
        return self


def load_teacher(path: str | Path) -> Teacher:
    """Load UNet, CLIP text encoder, tokenizer, scheduler and (if present) VAE with ``from_pretrained``."""
    backbone = UNetBackbone.from_pretrained(path)
    return Teacher(backbone=backbone, schedule=backbone.schedule)
