"""accelerate setup shared by the trainers.

The trainers are written against ``accelerate.Accelerator``, so the same code runs on one CPU, one GPU
or many processes under ``accelerate launch`` / ``torchrun`` (DDP). We write no distributed code here.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch

MixedPrecision = Literal["no", "fp16", "bf16"]


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator for one step's random draws, seeded statelessly from ``(seed, *parts)``.

    Trainers pass the step, the process index and a stream number (e.g. data vs noise), so a resumed
    run draws exactly what the uninterrupted run drew and each process draws its own noise. (A tuple
    of ints hashes the same in every Python process, unlike a string.)
    """
    return torch.Generator().manual_seed(hash((seed, *parts)) & 0x7FFF_FFFF_FFFF)


def seed_everything(seed: int, device_specific: bool = False) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA) via ``accelerate.utils.set_seed``.

    Args:
        seed: the seed.
        device_specific: add the process index to the seed, so each process draws different noise.
    """
    from accelerate.utils import set_seed

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    set_seed(seed, device_specific=device_specific)


def make_accelerator(
    mixed_precision: MixedPrecision = "no",
    gradient_accumulation_steps: int = 1,
    run_dir: str | os.PathLike | None = None,
    cpu: bool | None = None,
    seed: int | None = None,
    device_specific_seed: bool = False,
):
    """Build an ``accelerate.Accelerator`` from typed settings.

    Args:
        mixed_precision: "no", "fp16" (GPU only) or "bf16".
        gradient_accumulation_steps: micro-batches per optimizer step (use ``accelerator.accumulate``).
        run_dir: the run folder, given to accelerate as ``project_dir``.
        cpu: force the CPU; default: True exactly when no CUDA device is available.
        seed: when given, seeds every generator (`seed_everything`) after the process group exists.
        device_specific_seed: offset the seed by the process index. Off by default, because modules
            created after seeding but outside DDP (so never broadcast) must start equal on every rank.

    Raises:
        ValueError: an unknown precision, fp16 on the CPU, or a non-positive accumulation count.
    """
    from accelerate import Accelerator

    if mixed_precision not in get_args(MixedPrecision):
        raise ValueError(f"mixed_precision must be one of {list(get_args(MixedPrecision))}, got {mixed_precision!r}")
    if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
            or gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be a positive integer, got {gradient_accumulation_steps!r}")
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; on the CPU use mixed_precision 'bf16' or 'no'")
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        project_dir=os.fspath(run_dir) if run_dir is not None else None,
        cpu=cpu,
    )
    if seed is not None:
        seed_everything(seed, device_specific=device_specific_seed)
    return accelerator
