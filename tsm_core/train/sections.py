"""Recipe sections both trainers share, so one key means one thing in every recipe (issue 12).

``model`` names the diffusers pipeline (the model to adapt, or the DMD2 teacher) and ``experts``
holds the timestep-LoRA settings of `tsm_core.TSMConfig`, declared once here. Each trainer adds only
its own keys (``experts.text_encoder_targets`` for fine-tuning; ``experts.scales`` and
``experts.init_from`` for distillation). The README's "Recipe keys" table lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import TSMConfig

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class ModelSection:
    """Which diffusers pipeline to adapt (fine-tuning) or distill from (the DMD2 teacher)."""

    path: str
    """Pipeline folder or hub id (loaded with from_pretrained)."""
    kind: str = "unet"
    """Backbone family, one of `tsm_core.models.kinds()`: "unet" (SD1.5 / SD2 / pixel-space SD), "sdxl",
    "pixart" (PixArt-alpha), "sd3", and the video UNets "unet3d" (ModelScope / zeroscope
    UNet3DConditionModel) and "animatediff" (UNetMotionModel), plus any registered family."""
    max_sequence_length: int | None = None
    """T5 prompt length (PixArt default 120, SD3 default 256)."""

    def __post_init__(self):
        from ..models.registry import backbone_class

        backbone_class(self.kind)  # an unknown family is a ValueError that lists the known ones


@dataclass
class ExpertsSection:
    """The timestep LoRA experts (`tsm_core.TSMConfig`; paper eq. 3-5): rank, alpha and dropout of
    every expert, the layers that get them, and the router's input and activation (stage 2)."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Denoiser layers that get experts (peft-style suffixes)."""
    router_input: Literal["features", "timestep", "both"] = "both"
    """Router of eq. 5: Linear(features), Embedding(timestep), or their sum."""
    router_activation: Literal["none", "sigmoid", "softmax"] = "none"

    def tsm_config(self, scales, num_timesteps: int, target_modules=None) -> TSMConfig:
        """The `TSMConfig` of these settings for ``scales`` (interval counts) over ``num_timesteps``."""
        return TSMConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, scales=tuple(scales),
                         target_modules=list(self.target_modules if target_modules is None else target_modules),
                         num_timesteps=num_timesteps, router_input=self.router_input,
                         router_activation=self.router_activation)
