"""Exponential moving average of the trainable tensors of a run."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class EMA:
    """``shadow = decay * shadow + (1 - decay) * value`` for a named set of tensors.

    Only tensors passed to :meth:`update` move, so an EMA over every expert follows just the experts
    the current phase trains. ``state_dict``/``load_state_dict`` make it part of a checkpoint.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay!r}")
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in tensors.items()}

    def track(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start averaging tensors that appeared after creation (e.g. a router made in stage 2)."""
        for k, v in tensors.items():
            if k not in self.shadow:
                self.shadow[k] = v.detach().clone().float()

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write the averages into live tensors (e.g. ``tsm.state_dict()`` views) for evaluation."""
        for k, v in tensors.items():
            v.copy_(self.shadow[k].to(v.dtype))
