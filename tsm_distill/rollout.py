"""Backward simulation and few-step sampling through the student's timesteps (DMD2 section 4.5).

The student denoises at fixed timesteps, e.g. [999, 749, 499, 249]. To train step k on the inputs it
meets at inference, steps 0..k-1 are run first, without grad: predict x0, re-noise it with fresh noise
to the next student timestep. ``predict_x0(x, t)`` must route the generator by ``t`` (each step's own
expert, or the mixture), which it does when it runs inside ``tsm.timesteps(t)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tsm_core.models import Backbone

PredictX0 = Callable[[torch.Tensor, int], torch.Tensor]


def check_student_timesteps(timesteps: Sequence[int], num_timesteps: int = 1000) -> list[int]:
    """Student timesteps must be distinct ints in [0, T), in decreasing order (DDPM teachers; flow teachers
    give sigmas, see `check_student_sigmas`)."""
    ts = list(timesteps)
    if not ts:
        raise ValueError("student_timesteps is empty; the paper's 4-step student uses [999, 749, 499, 249]")
    for t in ts:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_timesteps:
            raise ValueError(f"student timestep {t!r} is out of range: each must be an int in [0, {num_timesteps})")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"student_timesteps must strictly decrease (noisiest first), got {ts}")
    return ts


def check_student_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Student sigmas of a flow-matching teacher must be numbers in (0, 1], strictly decreasing; the student
    step at sigma s runs at timestep ``t = s * T`` (what SD3's transformer and the TSM intervals receive)."""
    ss = list(sigmas)
    if not ss:
        raise ValueError("student_sigmas is empty; a 4-step SD3 student uses e.g. [1.0, 0.749, 0.499, 0.249] (one "
                         "n = 4 expert per step, recipes/sd3_dmd2_tsm.yaml)")
    for s in ss:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= 1.0:
            raise ValueError(f"student sigma {s!r} is out of range: each must be a number in (0, 1]")
    if any(a <= b for a, b in zip(ss, ss[1:])):
        raise ValueError(f"student_sigmas must strictly decrease (noisiest first), got {ss}")
    return [float(s) for s in ss]


Generators = torch.Generator | Sequence[torch.Generator] | None


def renoise(x0: torch.Tensor, t: float, schedule: Backbone, generator: Generators = None) -> torch.Tensor:
    """Fresh-noise ``x0`` to timestep ``t`` (the forward process q(x_t | x0) of the teacher's family:
    ``schedule`` is its backbone, or anything with its ``add_noise``).

    ``generator`` may be one generator for the batch, or one per sample (so a sample's noise does not
    depend on which batch it was drawn in).
    """
    if isinstance(generator, Sequence):
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=g.device, dtype=x0.dtype)
                             for g in generator]).to(x0.device)
    else:
        # Draw on the generator's device (a CPU generator may drive a GPU run), then move.
        where = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
    return schedule.add_noise(x0, noise, torch.full((x0.shape[0],), t, device=x0.device))  # long for ints


@torch.no_grad()
def backward_simulation(predict_x0: PredictX0, noise: torch.Tensor, k: int, timesteps: Sequence[float],
                        schedule: Backbone, generator: Generators = None) -> torch.Tensor:
    """The student's input at step ``k``: pure noise for k = 0, else the rollout of steps 0..k-1."""
    if not 0 <= k < len(timesteps):
        raise ValueError(f"student step k={k} is outside 0..{len(timesteps) - 1}")
    x = noise
    for i in range(k):
        x0 = predict_x0(x, timesteps[i])
        x = renoise(x0, timesteps[i + 1], schedule, generator)
    return x


@torch.no_grad()
def sample(predict_x0: PredictX0, noise: torch.Tensor, timesteps: Sequence[float], schedule: Backbone,
           generator: Generators = None) -> torch.Tensor:
    """Few-step sampling: the rollout through every student step, returning the last x0 estimate."""
    x = backward_simulation(predict_x0, noise, len(timesteps) - 1, timesteps, schedule, generator)
    return predict_x0(x, timesteps[-1])
