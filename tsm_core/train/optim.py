"""Optimizer plumbing every trainer shares: the warm-up schedule, gradient sync and clipping, the NaN stop.

One implementation each, so the fine-tuning and distillation trainers cannot drift apart again
(issue 12): the same warm-up semantics, the same treatment of experts that got no gradient, the same
error when a loss is not finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf: the run stops and keeps its last good checkpoint.

    A ``FloatingPointError``, so code that caught the fine-tuning trainer's old error still catches it.
    """


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' ``constant_with_warmup``: the learning rate rises linearly from 0 over ``warmup_steps``
    calls of ``step()``, then stays constant (DMD2's schedule).

    Not passed through ``accelerator.prepare``: accelerate's wrapper steps the schedule once per process
    per call (without ``split_batches``), so its warm-up would end ``num_processes`` times sooner.
    Here one ``step()`` is one trainer step on any number of processes; the caller decides what a
    step is (an optimizer step for fine-tuning, an iteration for DMD2).
    """
    from diffusers.optimization import get_scheduler

    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warm-up steps must be an integer >= 0, got {warmup_steps!r}")
    return get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=warmup_steps)


def sync_gradients(params: Sequence[torch.nn.Parameter], accelerator) -> None:
    """Average gradients over processes, in place; a no-op on one process.

    No DDP wrapper: the trained set changes per phase, and experts a batch did not route to have no
    gradient (DDP would reject parameters unused in a step). Those get zeros, so every process
    averages the same tensors and applies the same update.
    """
    if accelerator.num_processes == 1:
        return
    from .fsdp import is_sharded

    for p in params:
        if is_sharded(p):  # FSDP2 already reduce-scattered its gradient to the mean (tsm_core.train.fsdp)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def clip_gradients(params: Sequence[torch.nn.Parameter], accelerator, max_norm: float | None) -> torch.Tensor:
    """Clip the gradient norm at ``max_norm`` (``None``/0: no clipping) and return the norm before clipping.

    Through accelerate, which first unscales fp16 gradients: a plain ``clip_grad_norm_`` would clip
    the loss-scaled gradients, and the optimizer would then step on them.
    """
    return accelerator.clip_grad_norm_(params, max_norm or float("inf"))


def check_finite(loss: torch.Tensor, step: int, where: str, last_checkpoint: Path | None) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN/inf; the advice matches the run's state."""
    if bool(torch.isfinite(loss).all()):
        return
    if last_checkpoint is None:
        advice = ("no checkpoint was written yet, so start again (without --resume) with a lower learning "
                  "rate or gradient clipping")
    else:
        advice = (f"the last good checkpoint is {last_checkpoint}; lower the learning rate or enable gradient "
                  "clipping, then --resume")
    value = loss.item() if loss.numel() == 1 else "non-finite"
    raise NonFiniteLossError(f"{where} loss is {value} at step {step}; stopping. {advice}.")
