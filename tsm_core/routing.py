"""Route a stock pipeline's denoiser calls by the timestep the pipeline passes (inference only).

Training code wraps forward *and* backward in ``with tsm.timesteps(t):``. A stock diffusers pipeline
calls the denoiser itself, once per step, so :func:`route_by_timestep` installs hooks that enter the
adapter's timestep context around each call with that call's own ``t`` (broadcast to the batch): the
experts switch per step and the stage-2 router sees t. No backward runs through these calls, so hooks
that live only for the forward are enough here.
"""

from __future__ import annotations

import torch
from torch import nn


class TimestepRouting:
    """Installed hooks; remove them with :meth:`remove` or by leaving a ``with`` block."""

    def __init__(self, denoiser: nn.Module, tsm, timestep_scale: float = 1.0):
        self.tsm = tsm
        self.timestep_scale = timestep_scale
        # prepend: enter the context before any other pre-hook (e.g. accelerate's device hooks) runs
        self._handles = [denoiser.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True),
                         denoiser.register_forward_hook(self._exit)]

    def _enter(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if self.timestep_scale != 1.0:  # a DDPM UNet's integer timesteps stay integers
            t = t * self.timestep_scale
        self.tsm.context.push(t.expand(x.shape[0]) if t.numel() == 1 else t)

    def _exit(self, module, args, output):
        self.tsm.context.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> TimestepRouting:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def route_by_timestep(denoiser: nn.Module, tsm, timestep_scale: float = 1.0) -> TimestepRouting:
    """Route every call of ``denoiser`` (a UNet or transformer) by its own timestep, times ``timestep_scale``
    (1000 for a pipeline that passes sigma = t / 1000, as FluxPipeline does).

    Keep the returned handle, or use it as a context manager::

        with route_by_timestep(pipe.unet, tsm):
            images = pipe(prompts, num_inference_steps=20).images
    """
    return TimestepRouting(denoiser, tsm, timestep_scale)
