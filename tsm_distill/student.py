"""The generator (student): the teacher's denoiser with TSM experts, and the real score it doubles as."""

from __future__ import annotations

import torch

from tsm_core.models import Backbone, Cond


class Student:
    """x0 predictions of the generator, routed by timestep, plus the teacher's guided score.

    The frozen *real* score of DMD2 is the same denoiser with the experts bypassed
    (``TSMAdapter.bypass``), so the teacher's weights are held once. The backbone (``teacher``) gives
    the denoiser call and the x0 arithmetic of its family (DDPM eps/v, or flow velocity).
    """

    def __init__(self, teacher: Backbone, tsm):
        self.teacher, self.tsm = teacher, tsm

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Generator x0 at per-sample timesteps ``t``; the caller holds ``tsm.timesteps(t)`` (so backward can run inside it)."""
        return self.teacher.to_x0(x_t, self.teacher.predict(x_t, t, cond), t)

    def predict_x0(self, cond: Cond):
        """A ``predict_x0(x, t)`` for rollouts/sampling that routes each call by its own timestep."""
        def fn(x: torch.Tensor, t) -> torch.Tensor:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=self.teacher.timestep_dtype)
            with self.tsm.timesteps(tt):
                return self.x0(x, tt, cond)
        return fn

    @torch.no_grad()
    def real_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                    guidance_scale: float) -> torch.Tensor:
        """The teacher's raw output (epsilon, v or flow velocity) under its family's guidance
        (`Backbone.guided_predict`: classifier-free guidance, or Flux's embedded scale); ``uncond`` is the
        one-prompt "" conditioning."""
        with self.tsm.bypass():
            return self.teacher.guided_predict(x_t, t, cond, uncond, guidance_scale)
