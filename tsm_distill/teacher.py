"""The teacher of a distillation run: the shared backbone of its family, loaded from a pipeline folder.

The teacher gives the three DMD2 models their weights: the frozen *real* score, the trainable *fake*
score (a copy of its denoiser) and the *generator* (the denoiser plus TSM experts). Everything
distillation needs of it (prompt encoding, VAE, noise arithmetic, x0 from the denoiser's output, the
denoiser call) is the shared `tsm_core.models.Backbone`, so SD1.5, SDXL and SD3 teachers
differ only in their backbone class. Pixel-space pipelines without a VAE (the embedded Fashion-MNIST
teacher) work too: encode/decode are then the identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tsm_core.models import Backbone, Cond, backbone_class, kinds, load_backbone


def check_teacher_kind(kind: str) -> type:
    """The backbone class of a teacher family; a ValueError naming the distillable families otherwise."""
    supported = kinds(distillable=True)
    if kind not in supported:
        raise ValueError(f"model.kind {kind!r}: distillation supports the teacher families {list(supported)} "
                         "(a family's Backbone class sets distillable = True; see tsm_core.models.registry)")
    return backbone_class(kind)


def load_teacher(path: str | Path, kind: str = "unet", max_sequence_length: int | None = None) -> Backbone:
    """Load a teacher pipeline folder (or hub id) of family ``kind`` with ``from_pretrained``; families with a T5
    encoder encode prompts to ``max_sequence_length`` tokens (the recipe's ``model.max_sequence_length``; None:
    the family's default, SD3 256, Flux 512).

    Raises:
        ValueError: a family distillation does not support.
        FileNotFoundError: the folder (or one of its components) is missing.
    """
    check_teacher_kind(kind)
    return load_backbone(kind, path, max_sequence_length)


@torch.no_grad()
def encode(teacher: Backbone, prompts: list[str]) -> Cond:
    """The frozen teacher's conditioning of ``prompts`` (no graph: its text encoders never train here)."""
    return teacher.encode_prompts(list(prompts))
