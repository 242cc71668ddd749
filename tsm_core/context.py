"""The timestep context: how each sample's timestep reaches every routed layer.

The adapter owns one :class:`TimestepContext`; every wrapped layer holds a reference to it. The
context is set for a whole training step with ``with tsm.timesteps(t):`` and stays set through
``backward()``, so gradient checkpointing (which re-runs the forward during backward) routes each
sample to the same expert again. Hooks that only live during the forward pass would break that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    router_shared: bool = False  # every sample reads the same row of E (a timestep-only gate is one scalar)

    model_batch: int | None = None  # batch of the latest routed model's input in this block (attach's hook)
    _rows: dict[int, RoutingState] = field(default_factory=dict, repr=False)  # rows() cache, per step

    @property
    def batch(self) -> int:
        return self.t.shape[0]

    def rows(self, n: int, layer_name: str = "") -> RoutingState:
        """This state for a layer whose input has ``n`` rows: ``n // batch`` consecutive rows per sample.

        Video models fold frames or pixels into the batch, always sample-major (diffusers 0.42):
        ``UNet3DConditionModel`` and ``UNetMotionModel`` run their spatial layers on
        ``sample.permute(0, 2, 1, 3, 4).reshape(B * F, ...)`` (with ``emb`` and the text states
        ``repeat_interleave``d F times), so row r is video r // F; their temporal transformers
        (``TransformerTemporalModel``, AnimateDiff's motion modules) reshape that to
        ``(B * H * W, F, C)`` via ``reshape(B, F, C, H, W).permute(0, 3, 4, 2, 1)``, so row r is video
        r // (H * W); ``TemporalConvLayer``'s Conv3d sees ``(B, C, F, H, W)``: one row per video.
        In every case a row belongs to video ``r // (n // B)``, which is what this expands to.

        The model's own batch (its first input, recorded on entry) must still be one timestep per
        sample: folding is what a model does inside, not a licence for a short ``t``.

        Raises:
            ValueError: the model's batch differs from the number of timesteps, or ``n`` is not a
                multiple of it (`check_rows`).
        """
        self.check_rows(n, layer_name)
        if n == self.batch:
            return self
        cached = self._rows.get(n)
        if cached is None:
            m = n // self.batch
            cached = RoutingState(t=self.t.repeat_interleave(m),
                                  index={s: i.repeat_interleave(m) for s, i in self.index.items()},
                                  shared=self.shared, router_rows=self.router_rows.repeat_interleave(m),
                                  router_shared=self.router_shared)
            self._rows[n] = cached
        return cached

    def check_rows(self, n: int, layer_name: str = "") -> None:
        """Fail, in words, when a layer's ``n`` input rows cannot be mapped to the samples (see `rows`).
        Only checks: layers that route per sample, not per row, need no expanded state."""
        if self.model_batch is not None and self.model_batch not in (1, self.batch):
            raise ValueError(
                f"TSM layer {layer_name!r}: the model got a batch of {self.model_batch} but {self.batch} timesteps; "
                "pass one timestep per sample (for classifier-free guidance, repeat t for the unconditional half)"
            )
        if n % self.batch:
            raise ValueError(
                f"TSM layer {layer_name!r} got a batch of {n} rows but {self.batch} timesteps, and {n} is not a "
                "multiple of it, so its rows cannot be mapped to samples. Pass one timestep per sample (for "
                "classifier-free guidance, repeat t for the unconditional half); video models may fold frames "
                "or pixels into the batch, but only sample-major (B*F or B*H*W rows)."
            )


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
        rows = self.intervals.router_index(t)
        state = RoutingState(t=t, index=index, shared=shared, router_rows=rows,
                             router_shared=bool((rows == rows[0]).all()))
        self._stack.append(state)
        return state

    def pop(self) -> None:
        self._stack.pop()

    def enter_model(self, batch: int) -> None:
        """Record the batch of a routed model's input (called on every forward of an attached model)."""
        if self._stack:
            self._stack[-1].model_batch = batch

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
