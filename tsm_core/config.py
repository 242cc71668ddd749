"""TSMConfig: every setting of the timestep LoRA experts and their router, validated on creation."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

RouterInput = Literal["features", "timestep", "both"]
RouterActivation = Literal["none", "sigmoid", "softmax"]


@dataclass
class TSMConfig:
    """Settings of a TimeStep Master adapter.

    The LoRA update of an expert is ``(alpha / rank) * B A x`` (paper eq. 2-3).
    """

    rank: int = 4
    """LoRA rank r of every expert."""
    alpha: float = 4.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the expert input (training only)."""
    scales: tuple[int, ...] = (1,)
    """Interval counts n of the fostering stage, e.g. (1, 2, 4, 8). n = 1 is vanilla LoRA."""
    target_modules: list[str] | str = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Layers to wrap: a list of peft-style name suffixes, or one regex matched against full names."""
    num_timesteps: int = 1000
    """T, the number of training timesteps of the base model."""
    core_scale: int | None = None
    """Stage 2 core scale (eq. 5). Must be the finest scale; defaults to max(scales)."""
    context_scales: tuple[int, ...] | None = None
    """Stage 2 context scales; defaults to every scale but the core."""
    router_input: RouterInput = "both"
    """What the gate sees (eq. 6): FC(x) + E[t] ("both"), only FC(x), or only E[t]."""
    router_activation: RouterActivation = "none"
    """Gate activation. "none" is the paper's literal form; only it starts exactly at the core model."""
    router_zero_init: bool = True
    """Zero-initialise FC and E so stage 2 starts at the stage-1 core model (activation "none")."""

    def __post_init__(self):
        if isinstance(self.scales, int):
            self.scales = (self.scales,)
        self.scales = tuple(self.scales)
        if not self.scales:
            raise ValueError("scales must name at least one interval count, e.g. scales=(1, 4)")
        for n in self.scales:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"every scale must be a positive integer, got {n!r} in scales={self.scales}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must not repeat, got {self.scales}")
        self.scales = tuple(sorted(self.scales))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < max(self.scales):
            raise ValueError(
                f"num_timesteps must be an int >= the largest scale {max(self.scales)}, got {self.num_timesteps!r}"
            )
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules regex {self.target_modules!r} does not compile: {e}") from e
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(s, str) and s for s in self.target_modules):
                raise ValueError(f"target_modules must be a regex or a non-empty list of names, got {self.target_modules!r}")
        for name, allowed in (("router_input", RouterInput), ("router_activation", RouterActivation)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"{name} must be one of {allowed.__args__}, got {getattr(self, name)!r}")
        if self.context_scales is not None:
            self.context_scales = tuple(self.context_scales)
        self.core_scale, self.context_scales = self.resolve_mixture(self.core_scale, self.context_scales)

    # ------------------------------------------------------------------ stage 2 scales
    def resolve_mixture(self, core_scale=None, context_scales=None) -> tuple[int, tuple[int, ...]]:
        """Validate stage-2 scales (eq. 5): the core is the finest scale; contexts are other scales."""
        finest = max(self.scales)
        core = finest if core_scale is None else core_scale
        if core not in self.scales:
            raise ValueError(f"core_scale {core} is not one of the fostered scales {self.scales}")
        if core != finest:
            raise ValueError(
                f"core_scale must be the finest scale (paper eq. 5: the smallest interval is the core); "
                f"got {core}, finest is {finest}"
            )
        ctx = tuple(s for s in self.scales if s != core) if context_scales is None else tuple(context_scales)
        for s in ctx:
            if s not in self.scales:
                raise ValueError(f"context scale {s} is not one of the fostered scales {self.scales}")
            if s == core:
                raise ValueError(f"context_scales must not contain the core scale {core}")
        if len(set(ctx)) != len(ctx):
            raise ValueError(f"context_scales must not repeat, got {ctx}")
        return core, tuple(sorted(ctx))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        d = asdict(self)
        d["scales"] = list(self.scales)
        d["context_scales"] = list(self.context_scales)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TSMConfig:
        d = json.loads(text)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TSMConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)
