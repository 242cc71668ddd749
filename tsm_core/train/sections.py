"""Recipe sections both trainers share, so one key means one thing in every recipe (issue 12).

``model`` names the diffusers pipeline (the model to adapt, or the DMD2 teacher), ``experts`` holds
the timestep-LoRA settings of `tsm_core.TSMConfig`, and ``train`` (`RunSection`) the run settings, each
declared once here with one set of defaults. Each trainer adds only its own keys
(``experts.text_encoder_targets`` and ``train.batch_size`` for fine-tuning; ``experts.scales``,
``experts.init_from`` and the DMD2 settings for distillation). docs/recipes.md lists every key.

The checks the sections of both trainers share live here too: numbers that must be positive
(`require_at_least`, `require_positive`), and recipe strings that become folder names in the run
folder (`check_folder_name`, `child_folder`). Non-finite floats are refused by the loader itself
(`tsm_core.train.recipe`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import TSMConfig

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def require_at_least(minimum: int, **values) -> None:
    """Refuse each ``name=value`` below ``minimum`` (None passes: the setting is off); the message names
    the key within its section (the loader adds the section's path)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def require_positive(**values) -> None:
    """Refuse each ``name=value`` that is not > 0 (None passes: the setting is off or has a default)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def check_folder_name(name: str, key: str, folder: str) -> None:
    """Refuse a recipe string that names one folder inside the run folder (e.g. a phase's
    ``phases/NN_<name>``) unless it is a plain name: not blank, no path separator, not ``.`` or ``..``,
    no control characters. A name like ``../../x`` used to write its adapter outside the run folder.

    Args:
        key: the recipe key, for the message (e.g. ``name``).
        folder: the folder it becomes, for the message (e.g. ``phases/NN_<name>``).
    """
    bad = (not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep))
           or any(ord(c) < 32 for c in name))
    if bad:
        raise ValueError(f"{key} {name!r} must be a plain folder name (it becomes {folder} in the run folder): "
                         "not blank, without / or \\, not '.' or '..', no control characters; e.g. 'expert_999'")


def child_folder(parent: str | os.PathLike, *parts: str) -> Path:
    """``parent / parts...``, refused unless it lies strictly inside ``parent`` (symbolic links and ``..``
    resolved). The last line of defence where a recipe string becomes a path (``phases/NN_<name>``): the
    recipe's own check (`check_folder_name`) should have refused a bad name already.

    Raises:
        ValueError: the path would be ``parent`` itself or lie outside it.
    """
    root = Path(parent).resolve()
    resolved = root.joinpath(*parts).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ValueError(f"{Path(*parts) if parts else '(no name)'} would lie outside {root} (at {resolved}); "
                         "recipe names that become folders must be plain folder names")
    return Path(parent).joinpath(*parts)


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

    def __post_init__(self):
        # TSMConfig's own checks (rank >= 1, alpha > 0, dropout in [0, 1), targets), at load rather than
        # when the trainer attaches the experts; scales are each trainer's and checked there.
        self.tsm_config((1,), 1)

    def tsm_config(self, scales, num_timesteps: int, target_modules=None) -> TSMConfig:
        """The `TSMConfig` of these settings for ``scales`` (interval counts) over ``num_timesteps``."""
        return TSMConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, scales=tuple(scales),
                         target_modules=list(self.target_modules if target_modules is None else target_modules),
                         num_timesteps=num_timesteps, router_input=self.router_input,
                         router_activation=self.router_activation)


@dataclass
class RunSection:
    """Run settings both trainers share (``train:`` in a recipe), with one meaning and one default each.

    Batches are global in both trainers: a fine-tuning recipe's ``train.batch_size`` and a distillation
    phase's ``batch_size`` count the samples of one optimizer step summed over processes (and, for
    fine-tuning, over gradient-accumulation micro-batches), as the paper states them; each trainer prints
    the per-process size at start.
    """

    run_dir: str | None = None
    """The run folder; the command line's ``--run-dir`` overrides it; default ``runs/<recipe file's stem>``."""
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    cache_core_merge: bool = False
    """Assembling phases (stage 2): keep each layer's frozen core merged into a copy of its weight across
    steps (`TSMAdapter.set_merged_training` with ``cache_core=True``), so the core costs no more than the
    base layer. Costs one copy of the targeted weights in the compute dtype per core expert the phase uses
    (a 4-step student: four); ``tsm-distill --plan`` counts it. Not with a sharded generator (FSDP)."""
    max_grad_norm: float | None = 1.0
    """Clip the trained parameters' gradient norm (null: no clipping). diffusers' training scripts use 1.0;
    DMD2 uses 10, which the distillation recipes state."""
    checkpoint_every: int = 500
    """Steps between two checkpoints (a checkpoint is also written at every phase boundary)."""
    keep_last: int | None = 3
    """Complete checkpoints to keep (null: all)."""
    log_every: int = 10
    sample_every: int = 0
    """A sample grid every N steps (0: none mid-run; the final grid is written at the end)."""

    def __post_init__(self):
        # Checked here, not when first used: checkpoint_every = 0 used to divide by zero after step 1.
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1 (steps between two), got {getattr(self, name)}; "
                                 "use a large value to make it rare")
        if self.sample_every < 0:
            raise ValueError(f"train.sample_every must be >= 0 (0: no sample grids mid-run), got {self.sample_every}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"train.max_grad_norm must be >= 0 (0 or null: no clipping), got {self.max_grad_norm}")
