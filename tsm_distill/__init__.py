"""DMD2 distillation with timestep LoRA experts: one expert per student step, GAN phases, router phase.

Entry points: :class:`DMD2Trainer` (``tsm_distill.trainer``), the recipe schema
:class:`DistillRecipe` (``tsm_distill.config``), and the few-step sampler (``tsm_distill.sampler``).
"""

from .config import DistillRecipe, PhaseConfig
from .trainer import DMD2Trainer, NonFiniteLossError, load_student

__all__ = ["DMD2Trainer", "DistillRecipe", "NonFiniteLossError", "PhaseConfig", "load_student"]
