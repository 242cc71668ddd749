"""The one list of model families: recipe validation, distillation's teachers, flow-vs-DDPM and the
planner's meta build all read it, never a kind string of their own.

A family is a `tsm_core.models.base.Backbone` subclass; its class attributes say what it is:
``kind`` (the recipes' ``model.kind``), ``flow`` (rectified-flow timesteps ``t = sigma * T``, else DDPM),
``distillable`` (a DMD2 teacher: the distillation trainer and planner support it) and ``video``.
Adding a family is one module in ``tsm_core/models/`` plus one line in `FAMILIES` (or, from user code
and tests, one `register_backbone` call).
"""

from __future__ import annotations

import importlib
import os

FAMILIES: dict[str, str] = {
    "unet": "tsm_core.models.unets:UNetBackbone",
    "sdxl": "tsm_core.models.unets:SDXLBackbone",
    "unet3d": "tsm_core.models.unets:VideoUNetBackbone",
    "animatediff": "tsm_core.models.unets:MotionUNetBackbone",
    "pixart": "tsm_core.models.dits:PixArtBackbone",
    "sd3": "tsm_core.models.dits:SD3Backbone",
    "flux": "tsm_core.models.flux:FluxBackbone",
}
"""kind -> "module:Class" of the shipped families (imported when first asked for)."""

_registered: dict[str, type] = {}


def register_backbone(cls: type, kind: str | None = None) -> type:
    """Add a family (a `Backbone` subclass) under ``kind`` (default ``cls.kind``); returns ``cls``, so it
    also works as a class decorator. Registering another class under a taken kind is a ValueError."""
    from .base import Backbone

    kind = kind or getattr(cls, "kind", "")
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise ValueError(f"register_backbone: {cls!r} is not a tsm_core.models.Backbone subclass")
    if not kind:
        raise ValueError(f"register_backbone: {cls.__name__} has no kind; set the class attribute kind = '...'")
    taken = _registered.get(kind) or (FAMILIES.get(kind) and backbone_class(kind))
    if taken is not None and taken is not cls:
        raise ValueError(f"backbone kind {kind!r} is taken by {taken.__module__}.{taken.__name__}; pick another name")
    _registered[kind] = cls
    return cls


def unregister_backbone(kind: str) -> None:
    """Remove a family added with `register_backbone` (the shipped ones stay)."""
    _registered.pop(kind, None)


def kinds(**traits) -> tuple[str, ...]:
    """The family names, shipped then registered; keyword traits filter them, e.g. ``kinds(distillable=True)``."""
    names = list(FAMILIES) + [k for k in _registered if k not in FAMILIES]
    return tuple(k for k in names if all(getattr(backbone_class(k), a) == v for a, v in traits.items()))


def backbone_class(kind: str) -> type:
    """The `Backbone` subclass of family ``kind``; a ValueError listing the families for an unknown one."""
    if kind in _registered:
        return _registered[kind]
    if kind not in FAMILIES:
        raise ValueError(f"unknown backbone kind {kind!r} (model.kind); the families are {list(kinds())} "
                         "(a new one: tsm_core.models.register_backbone)")
    module, name = FAMILIES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_backbone(kind: str, path: str | os.PathLike, max_sequence_length: int | None = None):
    """Load a diffusers pipeline folder (or hub id) as a `Backbone` of family ``kind``.

    Args:
        kind: a registered family (`kinds()`): "unet" (SD1.5 / SD2, also pixel-space pipelines without a VAE),
            "sdxl", "pixart", "sd3", "flux", or the video UNets "unet3d" (ModelScope / zeroscope) and "animatediff".
        path: the pipeline folder or hub id.
        max_sequence_length: T5 prompt length (PixArt default 120, SD3 default 256, Flux default 512).

    Raises:
        ValueError: an unknown kind.
        FileNotFoundError: the folder (or one of its components) is missing.
    """
    return backbone_class(kind).from_pretrained(path, max_sequence_length=max_sequence_length)
