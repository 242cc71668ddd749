"""DMD2 losses as pure functions (Yin et al. 2024, "Improved Distribution Matching Distillation").

All inputs are batches shaped (B, C, H, W) unless noted; every function returns a scalar tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient in x0 space (DMD eq. 7, DMD2's normalised form).

    ``grad = (x0_fake - x0_real) / mean(|x0 - x0_real|)``, the mean taken per sample, so every
    sample's step has a comparable size. NaN/inf (a sample whose real prediction equals x0) become 0,
    where DMD2's plain ``nan_to_num`` would give the largest float and wreck the step.
    """
    weight = (x0 - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / weight, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient w.r.t. ``x0`` is ``dmd_gradient / numel``: ``0.5 * mse(x0, x0 - grad)``.

    ``x0_real`` and ``x0_fake`` must come from no-grad evaluations of the real (teacher, with CFG) and
    fake score models on the same noised ``x0``.
    """
    grad = dmd_gradient(x0.detach().float(), x0_real.float(), x0_fake.float())
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad).detach(), reduction="mean")


def fake_score_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score model on generator samples: ``mse(prediction, target)``.

    ``target`` is the noise for epsilon-prediction models, v for v-prediction models.
    """
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))``, averaged."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))``, each averaged over its batch."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def discriminator_accuracy(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of samples D classifies right (real > 0, fake < 0): a readable GAN health signal."""
    right = torch.cat([(real_logits.detach() > 0).flatten(), (fake_logits.detach() < 0).flatten()])
    return right.float().mean()
