"""Timestep LoRA expert layers (paper eq. 3 and eq. 5-6).

:class:`TSMLayer` wraps an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (kept as ``base_layer``, as in peft) and
holds, for every scale n, n LoRA experts ``(A_k, B_k)``. A sample at timestep t uses the expert of
its interval. Experts are separate parameters so an optimizer can own exactly the experts a phase
trains (AdamW would otherwise decay untouched rows of a stacked bank). For a batch with mixed
timesteps they are stacked and gathered so that every sample is routed in one batched matmul
(``bmm`` for Linear, a grouped convolution for convolutions), never a loop over samples. A batch that
shares one expert (DMD2's case) takes a plain-matmul fast path, or, where it costs less, runs merged:
one matmul / convolution on ``W + s B A`` with the experts' gradients computed in the backward
(``tsm_core.merged``; ``TSMAdapter.set_merged_training`` chooses the policy).

Video models fold frames (spatial layers, ``B*F`` rows) or pixels (temporal layers, ``B*H*W`` rows)
into the batch; a layer routes each row by its video's timestep (``RoutingState.rows``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import TSMConfig
from .context import RoutingState, TimestepContext
from .merged import (
    CALL_OVERHEAD,
    MergedFunction,
    MergedOp,
    MergePolicy,
    compute_dtype,
    merge_blocker,
    merge_pays,
    merged_weight,
)

Mode = Literal["off", "expert", "mixture", "symmetric"]
TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the layers that can carry experts
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def expert_key(scale: int, expert: int) -> str:
    return f"s{scale}_e{expert}"


def router_activation(logits: torch.Tensor, activation: str, dim: int) -> torch.Tensor:
    """The router's gates from its logits (eq. 5): as they are ("none"), sigmoid, or softmax over the
    context experts along ``dim``. One definition for the routed forward and the merged weight."""
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=dim)
    return logits


class TSMLayer(nn.Module):
    """A layer with timestep LoRA experts at several scales and an optional router; `tsm_layer` builds
    the subclass for the wrapped layer (`LinearTSMLayer`, `ConvTSMLayer`), as peft has one per layer type.

    Modes (set by :meth:`TSMAdapter.set_mode`):
      * ``off``: ``base_layer(x)`` exactly.
      * ``expert``: ``W x + s * B_k A_k x`` with k the sample's interval at one scale (eq. 3).
      * ``mixture``: ``W x + s * core(x) + sum_j g_j(x, t) * s * context_j(x)`` (eq. 5), with the
        gate ``g(x, t) = FC(x) + E[t]`` (eq. 6) computed per sample and per token.
      * ``symmetric``: every scale gated, no ungated core (the paper's ablation baseline).
    """

    kind = ""
    channel_dim = -1  # where a feature (and a gate, and a rank-r code) lives in this layer's tensors

    def __init__(self, base_layer: nn.Module, config: TSMConfig, context: TimestepContext, name: str = ""):
        super().__init__()
        in_f, out_f, a_shape = self._shapes(base_layer, config.rank, name)
        self.conv_dims = base_layer.weight.ndim - 2  # 0 for Linear; 1, 2, 3 for Conv1d/2d/3d
        self.base_layer = base_layer
        self.name = name
        self.in_features, self.out_features = in_f, out_f
        self.scaling = config.scaling
        self.scales = config.scales
        self.router_input = config.router_input
        self.router_activation = config.router_activation
        self.num_timesteps = config.num_timesteps
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        object.__setattr__(self, "context", context)  # shared, not a submodule
        p = base_layer.weight
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for n in config.scales:
            for k in range(n):
                A = torch.empty(a_shape, dtype=p.dtype, device=p.device)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's default for A; B starts at zero
                self.lora_A[expert_key(n, k)] = nn.Parameter(A)
                self.lora_B[expert_key(n, k)] = nn.Parameter(torch.zeros(out_f, config.rank, dtype=p.dtype, device=p.device))
        self.router_fc: nn.Parameter | None = None  # (k, in): FC(x) of eq. 6, no bias (E[t] is the bias)
        self.router_emb: nn.Parameter | None = None  # (T, k): E of eq. 6
        self.router_scales: tuple[int, ...] = ()  # the scales the router's k gates belong to
        self.mode: Mode = "off"
        self.active_scale: int | None = None
        self.core_scale: int | None = None
        self.gated_scales: tuple[int, ...] = ()
        self.merged = False
        self._lowrank_macs_per_row = config.rank * (math.prod(a_shape[1:]) + out_f)  # one expert, one position
        self.merge_policy: MergePolicy = "auto"  # merged-weight forward/backward for shared experts (set_merged_training)
        self.cache_core = False  # keep W + s B_core A_core of a frozen core across steps (set_merged_training)
        self._core_cache: dict[str, tuple[tuple, torch.Tensor]] = {}  # core expert -> (built from, merged weight)
        self._merged_backup: torch.Tensor | None = None
        self.gate_log: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (t, mean gate) when recording

    # ------------------------------------------------------------------ router
    def init_router(self, gated_scales: tuple[int, ...], zero_init: bool = True) -> None:
        """(Re)create the router of eq. 6 with one gate per gated scale."""
        p = self.base_layer.weight
        num_gates = len(gated_scales)
        self.router_scales = tuple(gated_scales)
        fc = emb = None
        if self.router_input in ("features", "both"):
            fc = torch.zeros(num_gates, self.in_features, dtype=p.dtype, device=p.device)
        if self.router_input in ("timestep", "both"):
            emb = torch.zeros(self.num_timesteps, num_gates, dtype=p.dtype, device=p.device)
        if not zero_init:
            for w in (fc, emb):
                if w is not None:
                    nn.init.normal_(w, std=0.02)
        self.router_fc = nn.Parameter(fc) if fc is not None else None
        self.router_emb = nn.Parameter(emb) if emb is not None else None

    # ------------------------------------------------------------------ per layer type
    @staticmethod
    def _shapes(base_layer: nn.Module, rank: int, name: str) -> tuple[int, int, tuple[int, ...]]:
        """(in features, out features, shape of A) of the wrapped layer; ValueError when it cannot carry experts."""
        raise NotImplementedError

    def _fc(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """FC(x) of eq. 6 with the (k, in) router weight: logits at the output's positions."""
        raise NotImplementedError

    def _per_row(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A (rows, c) tensor shaped to broadcast over ``x``'s positions along ``channel_dim``."""
        raise NotImplementedError

    def _down_shared(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``A x`` with one expert for the whole batch (x's layout, r channels)."""
        raise NotImplementedError

    def _down_gathered(self, x: torch.Tensor, scale: int, state: RoutingState) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_k x`` with each sample's (or row's) own expert: ``(z, B)`` with B gathered alike."""
        raise NotImplementedError

    def _up_shared(self, out: torch.Tensor, Z: torch.Tensor, Bc: torch.Tensor) -> torch.Tensor:
        """``out + Bc Z`` for the concatenated codes of every shared expert."""
        raise NotImplementedError

    def _up_gathered(self, out: torch.Tensor, z: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``out + B z`` with a gathered B per sample or row."""
        raise NotImplementedError

    def _match_gate(self, gate: torch.Tensor, z: torch.Tensor, gathered: bool) -> torch.Tensor:
        """The gate laid out like the code ``z`` it scales (already so unless a subclass regroups z)."""
        return gate

    # ------------------------------------------------------------------ gate
    def _gate(self, x: torch.Tensor, state: RoutingState | None) -> torch.Tensor:
        """g(x, t) = act(FC(x) + E[t]), with the k gates along ``channel_dim``."""
        logits = None
        if self.router_fc is not None:
            logits = self._fc(x, self.router_fc.to(x.dtype))
        if self.router_emb is not None:
            rows = state.rows(x.shape[0], self.name).router_rows if state.batch > 1 else state.router_rows
            e = self._per_row(self.router_emb[rows.to(self.router_emb.device)].to(x.dtype), x)  # (rows or 1, k)
            logits = e if logits is None else logits + e
        return router_activation(logits, self.router_activation, dim=self.channel_dim)

    # ------------------------------------------------------------------ experts
    def _expert_weights(self, scale: int, idx: torch.Tensor):
        """Gather each sample's A and B: (B, r, in[, kh, kw]) and (B, out, r)."""
        A = torch.stack([self.lora_A[expert_key(scale, k)] for k in range(scale)])
        B = torch.stack([self.lora_B[expert_key(scale, k)] for k in range(scale)])
        idx = idx.to(A.device)
        return A[idx], B[idx]

    def _down(self, x: torch.Tensor, scale: int, state: RoutingState | None):
        """First half of each sample's expert at ``scale`` (eq. 3): ``z = s * A_k x`` and its ``B_k``.

        Returns ``(z, B)``: for a batch sharing one expert, ``z`` keeps x's layout with r channels and
        ``B`` is (out, r); otherwise ``z`` is (samples, tokens, r) for Linear (a sample's rows are
        consecutive, so its frames or pixels join its tokens) / (rows, r, *spatial) for convolutions,
        and ``B`` is gathered per sample or row, (samples or rows, out, r). Scaling and gates act on the
        small ``z``, and all up-projections are summed into the base output in one pass (``_up``).
        """
        k = 0 if scale == 1 else state.shared[scale]
        if k is not None:  # fast path: the whole batch shares one expert, plain matmuls
            A = self.lora_A[expert_key(scale, k)].to(x.dtype)
            return self._down_shared(x, A) * self.scaling, self.lora_B[expert_key(scale, k)]
        z, B = self._down_gathered(x, scale, state)
        return z * self.scaling, B

    def _up(self, out: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``out + sum_j B_j z_j``: shared experts in one concatenated matmul fused with the add."""
        shared = [(z, B) for z, B in terms if B.ndim == 2]
        gathered = [(z, B) for z, B in terms if B.ndim == 3]
        dt = out.dtype
        if shared:
            Z = torch.cat([z for z, _ in shared], dim=self.channel_dim).to(dt)
            out = self._up_shared(out, Z, torch.cat([B for _, B in shared], dim=1).to(dt))  # (out, sum of ranks)
        for z, B in gathered:
            out = self._up_gathered(out, z.to(dt), B.to(dt))
        return out

    def _needs_context(self) -> bool:
        scales = (self.active_scale,) if self.mode == "expert" else (self.core_scale, *self.gated_scales)
        uses_t = self.mode in ("mixture", "symmetric") and self.router_emb is not None
        return uses_t or any(s is not None and s > 1 for s in scales)

    def forward(self, x: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if x is None:  # called with torch's own keyword: AnimateDiff's motion modules do proj_in(input=...)
            x = kwargs.pop("input")
        if self.mode == "off" or self.merged:
            return self.base_layer(x, *args, **kwargs)
        state = self.context.current(self.name) if self._needs_context() else self.context.peek()
        if state is not None and state.batch != 1:
            state.check_rows(x.shape[0], self.name)  # fails early, in words, when rows cannot be mapped to samples
        # (scale, gate index or None): the expert (eq. 3), or the core and the gated contexts (eq. 5)
        if self.mode == "expert":
            spec = [(self.active_scale, None)]
        else:
            spec = [(self.core_scale, None)] if self.core_scale is not None else []
            spec += [(s, j) for j, s in enumerate(self.gated_scales)]
        extra_args = bool(args or kwargs)
        weight = None  # the base weight, or the frozen core's cached merge standing in for it
        cached = self._frozen_core(x, state, spec, extra_args)
        if cached is not None:
            weight, spec = cached
        plan = self._merge_plan(x, state, spec, extra_args, weight)
        if plan is not None:
            out, rest = plan
        elif weight is not None:
            out, rest = MergedOp.of(self.base_layer).apply(x, weight, self.base_layer.bias), spec
        else:
            out, rest = self.base_layer(x, *args, **kwargs), spec
        g = self._gate(x, state) if any(j is not None for _, j in rest) else None
        if self.gate_log is not None and self.gated_scales:
            if g is None:  # every gate ran merged: log them without a graph (a recompute must save what the forward did)
                with torch.no_grad():
                    self._record_gate(self._gate(x, state), state)
            else:
                self._record_gate(g, state)
        if not rest:
            return out
        xd = self.dropout(x)
        terms = []
        for s, j in rest:
            z, B = self._down(xd, s, state)
            if j is not None:
                z = z * self._match_gate(g.narrow(self.channel_dim, j, 1), z, B.ndim == 3)
            terms.append((z, B))
        return self._up(out, terms)

    def _frozen_core(self, x: torch.Tensor, state: RoutingState | None, spec: list[tuple[int, int | None]],
                     extra_args: bool) -> tuple[torch.Tensor, list[tuple[int, int | None]]] | None:
        """``(W + s B_core A_core, the spec without the core)`` when the cached merge of a frozen core
        can stand in for the base weight (``set_merged_training(cache_core=True)``), else None.

        Stage 2 trains only the router (eq. 7), so the core's update is the same on every step: merged once,
        it costs the forward nothing and the backward only grad_x through the merged weight, which the base
        layer pays anyway. The merge is rebuilt when the weight or the core's A/B change in place (their
        version counters), or the dtype, device or core expert change. The choice depends on nothing that
        differs between a checkpoint's forward and its recompute (not on whether the cache exists yet).

        One merge is kept per core expert the batches have used: a 4-step student's router phase visits its
        four core experts in turn, and one slot would be rebuilt on nearly every step."""
        if not self.cache_core or self.merge_policy == "never" or extra_args or self.mode != "mixture" or not spec:
            return None
        s, j = spec[0]
        if j is not None or s != self.core_scale:
            return None
        k = 0 if s == 1 else state.shared[s]
        if k is None:  # samples in different core intervals: no one weight serves the batch
            return None
        name = expert_key(s, k)
        A, B = self.lora_A[name], self.lora_B[name]
        if A.requires_grad or B.requires_grad or merge_blocker(self.base_layer, self.dropout) is not None:
            return None
        w = self.base_layer.weight
        dtype = compute_dtype(x)
        key = (dtype, w.device, w.data_ptr(), w._version, A.data_ptr(), A._version, B.data_ptr(), B._version)
        hit = self._core_cache.get(name)
        if hit is None or hit[0] != key:
            self._core_cache.pop(name, None)  # free the stale merge before building the new one
            with torch.no_grad():
                hit = self._core_cache[name] = (key, merged_weight(w, [A], [B], [None], self.scaling, dtype))
        return hit[1], spec[1:]

    def _merge_plan(self, x: torch.Tensor, state: RoutingState | None, spec: list[tuple[int, int | None]],
                    extra_args: bool, weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, list[tuple[int, int | None]]] | None:
        """Run the experts that the whole batch shares as one op on merged weights, when that is exact and
        (policy ``auto``) cheaper by `merge_pays`: returns ``(output, experts still to add unmerged)``, or
        None for the unmerged path. A gated expert merges only when its gate is one number for the batch
        (a timestep-only router and one timestep row); a gate of FC(x) varies per token, so it stays unmerged
        while the core beside it merges. ``weight``: what the merge starts from instead of the base weight
        (the frozen core's cached merge, `_frozen_core`)."""
        # Nothing that changes between a checkpoint's forward and its recompute may steer this choice (the
        # recompute's saved tensors are checked against the forward's): so not gate logging, not x.requires_grad.
        if self.merge_policy == "never" or extra_args:
            return None
        if self.merge_policy == "auto" and 3 * len(spec) * self._lowrank_macs_per_row * (x.numel() // x.shape[self.channel_dim]) < CALL_OVERHEAD:
            return None  # cheap exit first: at this size every unmerged pass together costs less than one merged call
        if merge_blocker(self.base_layer, self.dropout) is not None:
            return None
        gate = None
        if any(j is not None for _, j in spec) and self.router_fc is None and state.router_shared:
            row = state.router_rows[:1].to(self.router_emb.device)
            gate = router_activation(self.router_emb[row], self.router_activation, dim=-1)[0]  # (k,)
        merged, rest = [], []
        for s, j in spec:
            k = 0 if s == 1 else state.shared[s]
            if k is not None and (j is None or gate is not None):
                merged.append((self.lora_A[expert_key(s, k)], self.lora_B[expert_key(s, k)], None if j is None else gate[j]))
            else:
                rest.append((s, j))
        if not merged:
            return None
        As, Bs, cs = (list(v) for v in zip(*merged))
        bl = self.base_layer
        op = MergedOp.of(bl)
        trained = [A.requires_grad or B.requires_grad or (c is not None and c.requires_grad) for A, B, c in merged]
        backward = torch.is_grad_enabled()
        pays, full = merge_pays(op, op.out_positions(x, tuple(bl.weight.shape[2:])), self.out_features,
                                As[0][0].numel(), [A.shape[0] for A in As], trained, backward, backward)
        if self.merge_policy == "auto" and not pays:
            return None
        if full:
            op = MergedOp.of(bl, full_weight_grad=True)
        out = MergedFunction.apply(x, bl.weight if weight is None else weight, bl.bias, op, self.scaling, compute_dtype(x),
                                   len(As), *As, *Bs, *cs)
        return out, rest

    def _record_gate(self, g: torch.Tensor, state: RoutingState) -> None:
        # Mean gate per sample (over tokens/pixels, and over the rows of a video): feeds "gate vs
        # timestep" logs and plots.
        dims = tuple(d for d in range(1, g.ndim) if d != self.channel_dim % g.ndim)
        mean = g.detach().float().mean(dim=dims) if dims else g.detach().float()
        if state is not None and state.batch > 1 and mean.shape[0] != state.batch:
            mean = mean.reshape(state.batch, -1, mean.shape[-1]).mean(dim=1)
        t = state.t.detach().float().cpu() if state is not None else torch.zeros(mean.shape[0])
        self.gate_log.append((t.expand(mean.shape[0]) if t.numel() == 1 else t, mean.cpu()))

    # ------------------------------------------------------------------ merge
    def expert_weight(self, scale: int, expert: int) -> torch.Tensor:
        """The dense update s * B A of one expert, shaped like the base weight."""
        A = self.lora_A[expert_key(scale, expert)]
        B = self.lora_B[expert_key(scale, expert)]
        return torch.einsum("or,ri...->oi...", B, A) * self.scaling  # B @ A; for convolutions over the kernel too

    def merged_delta(self, state: RoutingState | None) -> torch.Tensor:
        """Dense weight update for a batch that shares one timestep (used by ``TSMAdapter.merged``)."""
        def shared(scale):
            return 0 if scale == 1 else state.shared[scale]

        if self.mode == "expert":
            return self.expert_weight(self.active_scale, shared(self.active_scale))
        delta = self.expert_weight(self.core_scale, shared(self.core_scale)) if self.core_scale is not None else 0
        if self.gated_scales:
            if self.router_fc is not None and bool(self.router_fc.detach().abs().sum() > 0):
                raise ValueError(
                    f"{self.name}: the router gate depends on the features x (FC(x) is non-zero), so the mixture "
                    "cannot be fused into one weight. Run it unmerged, or train with router_input='timestep'."
                )
            p = self.base_layer.weight
            if self.router_emb is not None:
                logits = self.router_emb[state.router_rows[:1].to(p.device)][0]
            else:
                logits = torch.zeros(len(self.gated_scales), dtype=p.dtype, device=p.device)
            g = router_activation(logits, self.router_activation, dim=-1)
            for j, s in enumerate(self.gated_scales):
                delta = delta + g[j] * self.expert_weight(s, shared(s))
        return delta

    @torch.no_grad()
    def merge(self, state: RoutingState | None) -> None:
        if self.merged or self.mode == "off":
            return
        w = self.base_layer.weight
        delta = self.merged_delta(state).to(w.dtype)
        self._merged_backup = w.data.clone()  # restored bit for bit on unmerge
        w.data += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.data.copy_(self._merged_backup)
        self._merged_backup = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, scales={self.scales}, mode={self.mode}"


class LinearTSMLayer(TSMLayer):
    """Experts on an ``nn.Linear``: features last; a mixed batch routes with one ``bmm`` per sample."""

    kind = "linear"
    channel_dim = -1

    @staticmethod
    def _shapes(base_layer, rank, name):
        return base_layer.in_features, base_layer.out_features, (rank, base_layer.in_features)

    def _fc(self, x, w):
        return F.linear(x, w)

    def _per_row(self, v, x):
        return v.view(v.shape[0], *([1] * (x.ndim - 2)), -1)

    def _down_shared(self, x, A):
        return F.linear(x, A)

    def _down_gathered(self, x, scale, state):
        # One expert per sample: a sample's consecutive rows (a video's frames or pixels) join its tokens.
        A, B = self._expert_weights(scale, state.index[scale])
        return torch.bmm(x.reshape(state.batch, -1, self.in_features), A.to(x.dtype).transpose(1, 2)), B

    def _up_shared(self, out, Z, Bc):
        return torch.addmm(out.reshape(-1, self.out_features), Z.reshape(-1, Z.shape[-1]), Bc.t()).view(out.shape)

    def _up_gathered(self, out, z, B):
        n = z.shape[0]  # samples: z holds each sample's rows as its tokens
        return torch.baddbmm(out.reshape(n, -1, self.out_features), z, B.transpose(1, 2)).view(out.shape)

    def _match_gate(self, gate, z, gathered):
        return gate.reshape(z.shape[0], -1, 1) if gathered else gate  # z is (samples, tokens, r) when gathered


class ConvTSMLayer(TSMLayer):
    """Experts on an ``nn.Conv1d/2d/3d``: channels at dim 1; a mixed batch routes with a grouped convolution."""

    kind = "conv"
    channel_dim = 1

    @staticmethod
    def _shapes(base_layer, rank, name):
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
            raise ValueError(f"{name}: only convolutions with groups=1 and zero padding can carry TSM experts")
        return base_layer.in_channels, base_layer.out_channels, (rank, base_layer.in_channels, *base_layer.kernel_size)

    def _pointwise(self, w: torch.Tensor) -> torch.Tensor:
        """A (out, in) matrix as a 1x1(x1) kernel of this layer's convolution."""
        return w.view(*w.shape, *([1] * self.conv_dims))

    def _conv(self, x, w, **kw):
        return _CONV[self.conv_dims](x, w, **kw)

    def _fc(self, x, w):  # a 1x1 conv with the base stride, so the gate lives at the output resolution
        return self._conv(x, self._pointwise(w), stride=self.base_layer.stride)

    def _per_row(self, v, x):
        return self._pointwise(v)

    def _down_shared(self, x, A):
        bl = self.base_layer
        return self._conv(x, A, stride=bl.stride, padding=bl.padding, dilation=bl.dilation)

    def _down_gathered(self, x, scale, state):
        # Convolutions see frames as rows (B*F of them, few): gather one expert per row, then a grouped
        # conv in which row b's channels only meet row b's A, i.e. one gathered convolution.
        n, bl = x.shape[0], self.base_layer
        A, B = self._expert_weights(scale, state.rows(n, self.name).index[scale])
        z = self._conv(x.reshape(1, -1, *x.shape[2:]), A.to(x.dtype).reshape(-1, *A.shape[2:]), stride=bl.stride,
                       padding=bl.padding, dilation=bl.dilation, groups=n)
        return z.reshape(n, -1, *z.shape[2:]), B

    def _up_shared(self, out, Z, Bc):
        return out + self._conv(Z, self._pointwise(Bc))

    def _up_gathered(self, out, z, B):
        return out + torch.einsum("br...,bor->bo...", z, B)


def tsm_layer(base_layer: nn.Module, config: TSMConfig, context: TimestepContext, name: str = "") -> TSMLayer:
    """The `TSMLayer` subclass for ``base_layer`` (Linear or Conv1d/2d/3d), built around it."""
    if isinstance(base_layer, nn.Linear):
        return LinearTSMLayer(base_layer, config, context, name)
    if isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvTSMLayer(base_layer, config, context, name)
    raise ValueError(f"{name}: TSM experts wrap nn.Linear or nn.Conv1d/2d/3d, not {type(base_layer).__name__}")
