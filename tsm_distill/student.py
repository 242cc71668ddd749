"""The generator (student): the teacher UNet with TSM experts, and the real score it doubles as."""

from __future__ import annotations

import torch

from tsm_core.train.schedule import NoiseSchedule


class Student:
    """x0 predictions of the generator, routed by timestep, plus the teacher's CFG score.

    The frozen *real* score of DMD2 is the same UNet with the experts bypassed
    (``TSMAdapter.bypass``), so the teacher's weights are held once.
    """

    def __init__(self, unet, tsm, schedule: NoiseSchedule):
        self.unet, self.tsm, self.schedule = unet, tsm, schedule

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Generator x0 at per-sample timesteps ``t``; the caller holds ``tsm.timesteps(t)`` (so backward can run inside it)."""
        return self.schedule.to_x0(x_t, self.unet(x_t, t, encoder_hidden_states=cond).sample, t)

    def predict_x0(self, cond: torch.Tensor):
        """A ``predict_x0(x, t_int)`` for rollouts/sampling that routes each call by its own timestep."""
        def fn(x: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            with self.tsm.timesteps(tt):
                return self.x0(x, tt, cond)
        return fn

    @torch.no_grad()
    def real_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                    guidance_scale: float) -> torch.Tensor:
        """The teacher's raw output (epsilon or v) with classifier-free guidance; ``uncond`` is the ""
        embedding (1, L, D)."""
        with self.tsm.bypass():
            if guidance_scale == 1.0:
                return self.unet(x_t, t, encoder_hidden_states=cond).sample
            both = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([cond, uncond.expand_as(cond)])).sample
        out_c, out_u = both.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                guidance_scale: float) -> torch.Tensor:
        """The teacher's x0 with classifier-free guidance (DMD2's real score)."""
        return self.schedule.to_x0(x_t, self.real_output(x_t, t, cond, uncond, guidance_scale), t)
