"""The DMD2 critic: a trainable fake score model with a GAN head D on its bottleneck features.

D reads the fake UNet's mid-block output through a forward hook (no copied UNet forward). When
only D's logits are needed, the hook stops the forward right after the mid block, so the decoder
half of the UNet is not run: the same saving DMD2 gets from its 297-line copied forward.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn


def _fp32(device: torch.device):
    """Autocast off (DMD2 runs its head in fp32); meta tensors (tsm-distill --plan) have no autocast."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device_type=device.type, enabled=False)


class _StopAfterMidBlock(Exception):
    """Raised by the mid-block hook to end a classification-only forward early."""


class GANHead(nn.Module):
    """DMD2's discriminator head (SD1.5: 8x8x1280 bottleneck -> 1 logit).

    Conv k4 s2 -> GroupNorm -> SiLU -> Conv k4 s4 -> GroupNorm -> SiLU -> Conv 1x1 -> 1 logit. The second
    kernel shrinks for bottlenecks smaller than 8x8 (tiny test models); logits are averaged over any
    remaining positions, giving one logit per sample.
    """

    def __init__(self, channels: int, resolution: int = 8):
        super().__init__()
        groups = math.gcd(32, channels)
        after = max(1, (resolution + 2 - 4) // 2 + 1)
        k2 = min(4, after)
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, k2, stride=k2), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))  # (B,)


class Critic(nn.Module):
    """Fake score (full copy of the teacher UNet, or the teacher with a peft LoRA) plus GAN head.

    Args:
        teacher_unet: the teacher's UNet; it is deep-copied, never modified.
        lora_rank: ``None`` trains the full copy (DMD2's default); an int trains a peft LoRA of that
            rank on the copy instead (less memory).
        lora_targets: layers for the fake-score LoRA.
        with_head: build the GAN head (needed by GAN phases).
    """

    def __init__(self, teacher_unet: nn.Module, lora_rank: int | None = None,
                 lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"), with_head: bool = True):
        super().__init__()
        self.fake = copy.deepcopy(teacher_unet)
        self.fake.requires_grad_(lora_rank is None)
        if lora_rank is not None:
            from peft import LoraConfig

            self.fake.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets),
                                             init_lora_weights="gaussian"))
        cfg = self.fake.config
        # An estimate from the config; fit_head() measures the real bottleneck and rebuilds if it differs.
        self.head_resolution = max(1, cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1))
        self.head = GANHead(cfg.block_out_channels[-1], self.head_resolution) if with_head else None
        self._features: torch.Tensor | None = None
        self._stop_early = False
        self.fake.mid_block.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self._features = output
        if self._stop_early:
            raise _StopAfterMidBlock

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint needs: trainable fake-score weights and the head."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad or n.startswith("head.")}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Raw fake-score output (epsilon or v) at (x_t, t)."""
        self._stop_early = False
        return self.fake(x_t, t, encoder_hidden_states=cond).sample

    def discriminate(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """D's logit per sample: the head on the fake UNet's mid-block output (decoder skipped)."""
        if self.head is None:
            raise ValueError("this critic was built without a GAN head; set critic.gan_head: true in the recipe")
        features = self._bottleneck(x_t, t, cond)
        # DMD2 runs its classification head on ``features.float()``, outside mixed precision.
        with _fp32(features.device):
            return self.head(features.float())

    def _bottleneck(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The fake UNet's mid-block output (B, C, h, w), the decoder half skipped."""
        self._stop_early = True
        try:
            self.fake(x_t, t, encoder_hidden_states=cond)
        except _StopAfterMidBlock:
            pass
        finally:
            self._stop_early = False
        features, self._features = self._features, None
        return features

    @torch.no_grad()
    def fit_head(self, sample: torch.Tensor, cond: torch.Tensor) -> tuple[int, int]:
        """Size the GAN head from the bottleneck the fake UNet really gives ``sample`` (one batch of the
        size D will see), then run D once, so a head that cannot fit fails now, not at the first GAN step.

        The head is rebuilt only when the measured size differs from the config's estimate (an unchanged
        head keeps its initial weights). Returns the bottleneck's (h, w).

        Raises:
            ValueError: the head's convolutions do not fit the bottleneck (smaller than 2x2).
        """
        t = torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)
        features = self._bottleneck(sample, t, cond)
        h, w = features.shape[-2:]
        if self.head is not None and min(h, w) != self.head_resolution:
            param = next(self.head.parameters())
            self.head_resolution = min(h, w)
            self.head = GANHead(features.shape[1], self.head_resolution).to(param.device, param.dtype)
        if self.head is not None:
            try:
                with _fp32(features.device):
                    self.head(features.float())
            except RuntimeError as e:
                raise ValueError(f"the GAN head does not fit the fake UNet's {h}x{w} bottleneck "
                                 f"(it needs at least 2x2): {e}") from e
        return h, w
