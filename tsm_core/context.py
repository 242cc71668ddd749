"""The timestep context: how each sample's timestep reaches every routed layer.

The adapter owns one :class:`TimestepContext`; every wrapped layer holds a reference to it. The
context is set for a whole training step with ``with tsm.timesteps(t):`` and stays set through
``backward()``, so gradient checkpointing (which re-runs the forward during backward) routes each
sample to the same expert again. Hooks that only live during the forward pass would break that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .intervals import TimestepIntervals


class TimestepContextError(RuntimeError):
    """A routed layer ran while no timestep was set (outside ``with tsm.timesteps(t):``)."""


@dataclass
class RoutingState:
    """Routing decided once per ``timesteps(t)`` block and read by every layer."""

    t: torch.Tensor  # (B,) timesteps as given
    index: dict[int, torch.Tensor]  # scale -> (B,) expert index per sample (eq. 3)
    shared: dict[int, int | None]  # scale -> the one expert every sample uses, else None
    router_rows: torch.Tensor  # (B,) row of the router embedding E per sample (eq. 6)

    @property
    def batch(self) -> int:
        return self.t.shape[0]


class TimestepContext:
    """Per-sample timesteps for all layers of one or more adapters (they may share a context)."""

    def __init__(self, intervals: TimestepIntervals):
        self.intervals = intervals
        self._stack: list[RoutingState] = []

    @property
    def active(self) -> bool:
        return bool(self._stack)

    def push(self, t) -> RoutingState:
        """Validate ``t`` and compute every scale's expert index once for the whole step."""
        t = self.intervals.check(t)
        index, shared = {}, {}
        for n in self.intervals.scales:
            idx = self.intervals.index(t, n)
            index[n] = idx
            # One host sync per step (not per layer): lets layers take the plain-matmul fast path
            # when the whole batch shares one expert, as in DMD2 where k is shared per iteration.
            shared[n] = int(idx[0]) if bool((idx == idx[0]).all()) else None
        state = RoutingState(t=t, index=index, shared=shared, router_rows=self.intervals.router_index(t))
        self._stack.append(state)
        return state

    def pop(self) -> None:
        self._stack.pop()

    def peek(self) -> RoutingState | None:
        """The innermost routing state, or None outside every ``timesteps`` block (layers that do not
        need a timestep still use one when it is there)."""
        return self._stack[-1] if self._stack else None

    def current(self, layer_name: str = "") -> RoutingState:
        if not self._stack:
            raise TimestepContextError(
                f"TSM layer {layer_name!r} ran with no timestep set. Wrap the forward AND backward pass in "
                "`with tsm.timesteps(t):` (gradient checkpointing re-runs the forward during backward), "
                "or call tsm.set_mode('off') to run the base model."
            )
        return self._stack[-1]
