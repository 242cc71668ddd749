"""The DMD2 critic: a trainable fake score model with a GAN head D on its bottleneck features.

D reads the fake denoiser's bottleneck through a forward hook (no copied UNet forward): a UNet's mid
block (SD1.5, SDXL: DMD2's choice), an MM-DiT's middle joint block (SD3; DMD2 has no SD3 model, so
this is our choice, the transformer's analogue of the bottleneck). When only D's logits are needed,
the hook stops the forward right after that module, so the decoder half of the UNet (the later
blocks of the transformer) is not run: the same saving DMD2 gets from its 297-line copied forward.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from tsm_core.train.fsdp import denoiser_units


def _fp32(device: torch.device):
    """Autocast off (DMD2 runs its head in fp32); meta tensors (tsm-distill --plan) have no autocast."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device_type=device.type, enabled=False)


class _StopAfterBottleneck(Exception):
    """Raised by the bottleneck hook to end a classification-only forward early."""


class GANHead(nn.Module):
    """DMD2's discriminator head, sized from the bottleneck it reads (channels x resolution^2 -> 1 logit).

    ``[Conv k4 s2 -> GroupNorm -> SiLU] x d -> Conv k4 s4 -> GroupNorm -> SiLU -> Conv 1x1``, with d the
    stride-2 stages that bring the bottleneck down to 4x4: d = 1 for SD1.5's 8x8 mid block and d = 3 for
    SDXL's 32x32 one, DMD2's two heads (``main/sd_guidance.py``); other sizes follow the same rule
    (SD3 at 1024 px: 64x64 tokens, d = 4). The k4 s4 kernel shrinks for bottlenecks already below 4x4
    (tiny test models); logits are averaged over any remaining positions, giving one logit per sample.
    """

    def __init__(self, channels: int, resolution: int = 8):
        super().__init__()
        groups = math.gcd(32, channels)
        if channels // groups < 2:  # a 1x1 map after the last conv needs >= 2 channels per norm group
            groups = math.gcd(groups, channels // 2) or 1
        downs = max(1, math.ceil(math.log2(resolution / 4))) if resolution > 4 else 1
        layers, side = [], resolution
        for _ in range(downs):
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            side = max(1, (side + 2 - 4) // 2 + 1)
        k = min(4, side)
        layers += [nn.Conv2d(channels, channels, k, stride=k), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))  # (B,)


class Critic(nn.Module):
    """Fake score (full copy of the teacher's denoiser, or the denoiser with a peft LoRA) plus GAN head.

    Args:
        teacher: the teacher's backbone (`tsm_core.models.Backbone`); its denoiser is
            deep-copied, never modified, and called through the backbone's ``predict`` (so SDXL's added
            conditioning and SD3's pooled projections reach the fake score and D alike).
        lora_rank: ``None`` trains the full copy (DMD2's default); an int trains a peft LoRA of that
            rank on the copy instead (less memory).
        lora_targets: layers for the fake-score LoRA.
        with_head: build the GAN head (needed by GAN phases).
    """

    def __init__(self, teacher, lora_rank: int | None = None,
                 lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"), with_head: bool = True):
        super().__init__()
        self.teacher = teacher
        self.fake = copy.deepcopy(teacher.denoiser)
        self.fake.requires_grad_(lora_rank is None)
        if lora_rank is not None:
            from peft import LoraConfig

            self.fake.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(lora_targets),
                                             init_lora_weights="gaussian"))
        # An estimate from the config; fit_head() measures the real bottleneck and rebuilds if it differs.
        self.head_channels, self.head_resolution = teacher.bottleneck_size()
        self.head = GANHead(self.head_channels, self.head_resolution) if with_head else None
        self._features = None
        self._stop_early = False
        teacher.bottleneck(self.fake).register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self._features = output
        if self._stop_early:
            raise _StopAfterBottleneck

    def shard_units(self) -> list[nn.Module]:
        """The FSDP units when the critic is sharded (``train.fsdp``), innermost first: the fake denoiser's
        (`tsm_core.train.fsdp.denoiser_units`, the fake denoiser last), then the head: the two modules the
        trainer calls."""
        return [*denoiser_units(self.fake), *([self.head] if self.head is not None else [])]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint needs: trainable fake-score weights and the head."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad or n.startswith("head.")}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Raw fake-score output (epsilon, v or flow velocity) at (x_t, t)."""
        self._stop_early = False
        return self.teacher.predict(x_t, t, cond, denoiser=self.fake)

    def discriminate(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """D's logit per sample: the head on the fake denoiser's bottleneck (the rest skipped)."""
        if self.head is None:
            raise ValueError("this critic was built without a GAN head; set critic.gan_head: true in the recipe")
        features = self._bottleneck(x_t, t, cond)
        # DMD2 runs its classification head on ``features.float()``, outside mixed precision.
        with _fp32(features.device):
            return self.head(features.float())

    def _bottleneck(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The fake denoiser's bottleneck features (B, C, h, w), the rest of its forward skipped."""
        self._stop_early = True
        try:
            self.teacher.predict(x_t, t, cond, denoiser=self.fake)
        except _StopAfterBottleneck:
            pass
        finally:
            self._stop_early = False
        output, self._features = self._features, None
        return self.teacher.bottleneck_features(output, x_t)

    @torch.no_grad()
    def fit_head(self, sample: torch.Tensor, cond: dict) -> tuple[int, int]:
        """Size the GAN head from the bottleneck the fake UNet really gives ``sample`` (one batch of the
        size D will see), then run D once, so a head that cannot fit fails now, not at the first GAN step.

        The head is rebuilt only when the measured size differs from the config's estimate (an unchanged
        head keeps its initial weights). Returns the bottleneck's (h, w).

        Raises:
            ValueError: the head's convolutions do not fit the bottleneck (smaller than 2x2).
        """
        t = torch.zeros(sample.shape[0], dtype=self.teacher.timestep_dtype, device=sample.device)
        features = self._bottleneck(sample, t, cond)
        h, w = features.shape[-2:]
        if self.head is not None and (min(h, w), features.shape[1]) != (self.head_resolution, self.head_channels):
            param = next(self.head.parameters())
            self.head_channels, self.head_resolution = features.shape[1], min(h, w)
            self.head = GANHead(self.head_channels, self.head_resolution).to(param.device, param.dtype)
        if self.head is not None:
            try:
                with _fp32(features.device):
                    self.head(features.float())
            except RuntimeError as e:
                raise ValueError(f"the GAN head does not fit the fake UNet's {h}x{w} bottleneck "
                                 f"(it needs at least 2x2): {e}") from e
        return h, w
