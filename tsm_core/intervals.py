"""Timestep intervals: which expert owns a timestep, at every scale (paper section 3.1, eq. 3-4).

The T training timesteps are split into n equal intervals at each scale n. Interval k of scale n
covers the timesteps t with ``k * T / n <= t < (k + 1) * T / n``, so the expert index is
``floor(t * n / T)``. For T = 1000 and n = 4 the DMD2 student steps 999, 749, 499 and 249 map to
experts 3, 2, 1 and 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class TimestepIntervals:
    """Maps timesteps to expert indices at several interval scales.

    Args:
        num_timesteps: T, the number of training timesteps of the diffusion model (1000 for SD).
        scales: the interval counts n, e.g. ``(1, 2, 4, 8)``. ``n = 1`` is vanilla LoRA.

    Timesteps may be ints (DDPM indices in ``[0, T)``) or floats in ``[0, T]`` (flow-matching
    models such as SD3 pass ``sigma * T``; ``t == T``, i.e. sigma 1, belongs to the last interval).
    Use :meth:`from_sigmas` to map flow-matching sigmas in ``[0, 1]`` onto ``[0, T]``.
    """

    def __init__(self, num_timesteps: int = 1000, scales: Iterable[int] = (1,)):
        scales = tuple(scales)
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        for n in scales:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"every scale must be a positive integer, got {n!r} in scales={scales}")
            if n > num_timesteps:
                raise ValueError(f"scale {n} has more intervals than num_timesteps={num_timesteps}")
        self.num_timesteps = num_timesteps
        self.scales = tuple(sorted(set(scales)))

    def __repr__(self) -> str:
        return f"TimestepIntervals(num_timesteps={self.num_timesteps}, scales={self.scales})"

    def to_dict(self) -> dict:
        return {"num_timesteps": self.num_timesteps, "scales": list(self.scales)}

    # ------------------------------------------------------------------ mapping
    def check(self, t) -> torch.Tensor:
        """Return ``t`` as a 1-D tensor, raising ValueError when any timestep is out of range."""
        t = torch.as_tensor(t)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim != 1:
            raise ValueError(f"timesteps must be a scalar or a 1-D per-sample tensor, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool:
            raise ValueError("timesteps must be numbers, got booleans (True/False would silently pick timestep 1/0)")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = t[~torch.isfinite(t)][:4].tolist()
            raise ValueError(f"timesteps must be finite numbers, got {bad}: a NaN or inf timestep has no interval "
                             "(check the sampler or the sigma -> t mapping that produced it)")
        T = self.num_timesteps
        hi = T - 1 if not t.is_floating_point() else T
        if t.numel() and (bool((t < 0).any()) or bool((t > hi).any())):
            raise ValueError(
                f"timesteps must lie in [0, {hi}] for num_timesteps={T}; got min {t.min().item()}, "
                f"max {t.max().item()}. Flow-matching sigmas in [0, 1] go through TimestepIntervals.from_sigmas."
            )
        return t

    def index(self, t, scale: int) -> torch.Tensor:
        """Expert index of each timestep at ``scale`` (eq. 3): ``floor(t * n / T)``, a long tensor."""
        if scale not in self.scales:
            raise ValueError(f"scale {scale} is not one of the configured scales {self.scales}")
        t = self.check(t)
        idx = torch.floor(t.double() * scale / self.num_timesteps).long()
        return idx.clamp_(max=scale - 1)  # t == T (sigma 1) belongs to the last interval

    def bounds(self, scale: int, expert: int) -> tuple[int, int]:
        """Integer timesteps ``[lo, hi)`` owned by ``expert`` at ``scale`` (used by sequential fostering)."""
        if scale not in self.scales:
            raise ValueError(f"scale {scale} is not one of the configured scales {self.scales}")
        if not 0 <= expert < scale:
            raise ValueError(f"scale {scale} has experts 0..{scale - 1}, got expert {expert}")
        T = self.num_timesteps
        return math.ceil(expert * T / scale), math.ceil((expert + 1) * T / scale)

    def from_sigmas(self, sigmas) -> torch.Tensor:
        """Map flow-matching sigmas in ``[0, 1]`` onto float timesteps in ``[0, T]``."""
        s = torch.as_tensor(sigmas, dtype=torch.float32)
        if s.numel() and (bool((s < 0).any()) or bool((s > 1).any())):
            raise ValueError(f"sigmas must lie in [0, 1], got min {s.min().item()}, max {s.max().item()}")
        return s * self.num_timesteps

    def router_index(self, t) -> torch.Tensor:
        """Row of the router embedding E for each timestep: the integer timestep in ``[0, T)``."""
        t = self.check(t)
        return torch.floor(t.double()).long().clamp_(0, self.num_timesteps - 1)
