"""DDPM noise-schedule arithmetic for discrete timesteps (epsilon or v prediction): the one implementation.

The UNet/PixArt backbones (fine-tuning), the DMD2 teacher, generator and rollout, and the embedded
teacher's training script all noise, regress and recover x0 through this class, so the three never
disagree about the forward process.
"""

from __future__ import annotations

from typing import Literal

import torch

Prediction = Literal["epsilon", "v_prediction", "sample"]


class NoiseSchedule:
    """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t`` the cumulative alpha of a DDPM scheduler.

    Args:
        alphas_cumprod: (T,) tensor from a diffusers scheduler (``scheduler.alphas_cumprod``).
        prediction_type: what the model outputs: ``epsilon``, ``v_prediction`` or ``sample``.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: Prediction = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double().clone()
        self.prediction_type = prediction_type
        self.num_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        return cls(torch.as_tensor(scheduler.alphas_cumprod), scheduler.config.prediction_type)

    def _coeffs(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sa, sb = self._coeffs(t, x0)
        return sa * x0 + sb * noise

    def to_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's clean-sample estimate from its raw output."""
        sa, sb = self._coeffs(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sb * output) / sa
        if self.prediction_type == "v_prediction":
            return sa * x_t - sb * output
        return output

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the denoising loss in the model's own parameterisation."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            sa, sb = self._coeffs(t, x0)
            return sa * noise - sb * x0
        return x0
