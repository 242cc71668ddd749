"""The paper's A.3 distillation schedule scaled to the demo: ``tsm-demo --protocol a3p``.

Appendix A.3 (SD1.5, DMD2) trains, in DMD2 iterations:

* vanilla LoRA: 40K without the GAN loss, then 5K with it, at 4x TSM's batch;
* TSM stage 1 (one n = 4 expert per student step): 999 and 749 20K + 5K each, 499 5K + 20K,
  249 5K + 40K (without / with the GAN);
* TSM stage 2: the router alone, 2K with the GAN;
* batch 32 without the GAN and 16 with it for TSM, "4 times for vanilla LoRA" (128 / 64).

So TSM gets 2.67x LoRA's iterations and LoRA 2x TSM's samples. The A.3-proportional protocol keeps
every one of these lengths up to one factor ``s``, chosen so that the LoRA student keeps the length it
has in the recipe (the demo's 1,200 iterations: s = 1200 / 45000), and keeps the batch ratios: GAN
phases at half the non-GAN batch, LoRA at 4x TSM's batch in every phase. The non-GAN batch of TSM is
the recipe's (or ``--batch-size``).

Reading kept: "steps" in A.3 are DMD2 iterations (every one updates the fake score, every F-th also the
generator), the unit our ``PhaseConfig.steps`` counts; F and the learning rates stay the recipes'.
Warm-up stays the recipes' absolute iteration count (DMD2's ``--warmup_step`` does not scale with the
run's length), capped at the phase's length.
"""

from __future__ import annotations

import math

from tsm_core.intervals import TimestepIntervals

A3P_BUDGET_DEFINITION = (
    "A.3-proportional: the students do not get equal generator steps. Every phase is A.3's length times "
    "s = 1200 / 45000 (LoRA 1,067 iterations without the GAN + 133 with it, at 4x TSM's batch; TSM experts "
    "999 and 749 533 + 133, 499 133 + 533, 249 133 + 1,067; router 53), so TSM runs 2.67x LoRA's "
    "iterations and LoRA sees 2x TSM's samples, as in A.3. A generator step is one optimizer update of "
    "the student: ceil(I / F) of them in a phase of I iterations with F fake-score updates per generator "
    "update. The students' iterations, generator updates and samples are in results.json's students."
)
"""What results.md's budget paragraph says for ``--protocol a3p`` (the equal-budget wording does not hold)."""

A3_LORA = {False: 40_000, True: 5_000}
"""Vanilla LoRA's iterations without / with the GAN loss (gan flag -> iterations)."""
A3_EXPERTS = {999: {False: 20_000, True: 5_000}, 749: {False: 20_000, True: 5_000},
              499: {False: 5_000, True: 20_000}, 249: {False: 5_000, True: 40_000}}
"""Each TSM expert's iterations without / with the GAN loss, by the student step it serves."""
A3_ROUTER = 2_000
"""The router phase (stage 2, with the GAN loss)."""
A3_LORA_BATCH_MULTIPLIER = 4
"""'The batch size is 32 without GAN loss and 16 with it (4 times for vanilla LoRA)'."""
A3_GAN_BATCH_DIVISOR = 2
"""32 without the GAN, 16 with it."""
PROTOCOLS = ("recipe", "a3p")
"""recipe: the recipes' own phase lengths (equal generator steps; ``--lora-batch-multiplier`` may
still scale LoRA's batch); a3p: the A.3 lengths and batch ratios scaled by one factor (this module)."""


def phase_value(phase: dict, key: str):
    """A recipe phase dict's ``key``, or PhaseConfig's default when the recipe does not name it."""
    from dataclasses import fields

    from ..config import PhaseConfig

    return phase[key] if key in phase else next(f.default for f in fields(PhaseConfig) if f.name == key)


def a3p_scale(lora_iterations: int) -> float:
    """The factor s that maps A.3's 45K LoRA iterations onto ``lora_iterations``."""
    if lora_iterations < 1:
        raise ValueError(f"the LoRA recipe has {lora_iterations} iterations; A.3-proportional phases need at least 1")
    return lora_iterations / sum(A3_LORA.values())


def scaled(iterations: int, s: float) -> int:
    """A.3's ``iterations`` times s, rounded to the nearest iteration, never below one."""
    return max(1, round(iterations * s))


def _expert_timestep(phase: dict, timesteps: list[int], num_timesteps: int) -> int:
    """The A.3 student step a foster phase trains (its single expert's interval holds exactly one)."""
    scale, experts = phase.get("scale"), phase.get("experts")
    if not scale or not experts or len(experts) != 1:
        raise ValueError(f"--protocol a3p: expert phase {phase.get('name')!r} must train one expert of one scale "
                         f"(A.3 trains one expert per student step); it has scale {scale}, experts {experts}")
    intervals = TimestepIntervals(num_timesteps, (scale,))
    inside = [t for t in timesteps if int(intervals.index(t, scale)[0]) == experts[0]]
    if len(inside) != 1 or inside[0] not in A3_EXPERTS:
        raise ValueError(f"--protocol a3p: expert phase {phase.get('name')!r} serves student steps {inside}; A.3 "
                         f"gives lengths for one expert per step of {sorted(A3_EXPERTS, reverse=True)}")
    return inside[0]


def a3p_phases(lora: list[dict], experts: list[dict], routers: list[dict], timesteps: list[int],
               base_batch: int, num_timesteps: int = 1000) -> tuple[list[dict], list[dict], list[dict], float]:
    """The three students' phases under the A.3-proportional protocol, and the factor s used.

    ``lora``, ``experts`` and ``routers`` are the recipes' phase dicts (LoRA run; TSM's foster phases;
    TSM's assemble phases); their ``steps`` give LoRA's length, which fixes s. ``base_batch`` is TSM's
    non-GAN batch. Every phase gets its A.3 length times s and its batch: ``base_batch`` (TSM, no GAN),
    half of it (TSM, GAN), four times those (LoRA).
    """
    if base_batch < A3_GAN_BATCH_DIVISOR or base_batch % A3_GAN_BATCH_DIVISOR:
        raise ValueError(f"--protocol a3p halves the batch in GAN phases (A.3: 32 -> 16); the non-GAN batch "
                         f"{base_batch} must be even and at least {A3_GAN_BATCH_DIVISOR}")
    for name, phases in (("LoRA", lora), ("TSM expert", experts), ("TSM router", routers)):
        if not phases:
            raise ValueError(f"--protocol a3p: the {name} recipe has no phase")
    s = a3p_scale(sum(p["steps"] for p in lora))
    seen = set()
    for p in lora:
        key = ("lora", bool(p.get("gan", False)))
        if key in seen:
            raise ValueError("--protocol a3p: the LoRA recipe must have one phase without and one with the GAN "
                             f"(A.3: 40K + 5K); {p.get('name')!r} repeats one")
        seen.add(key)

    def batch(p: dict, multiplier: int = 1) -> int:
        return multiplier * (base_batch // A3_GAN_BATCH_DIVISOR if phase_value(p, "gan") else base_batch)

    def shaped(p: dict, iterations: int, multiplier: int = 1) -> dict:
        steps = scaled(iterations, s)
        return dict(p, steps=steps, batch_size=batch(p, multiplier),
                    warmup_steps=min(steps, phase_value(p, "warmup_steps")))

    new_lora = [shaped(p, A3_LORA[bool(p.get("gan", False))], A3_LORA_BATCH_MULTIPLIER) for p in lora]
    new_experts = []
    for p in experts:
        t = _expert_timestep(p, timesteps, num_timesteps)
        key = (t, bool(p.get("gan", False)))
        if key in seen:
            raise ValueError(f"--protocol a3p: two expert phases train step {t} {'with' if key[1] else 'without'} "
                             "the GAN; A.3 has one of each")
        seen.add(key)
        new_experts.append(shaped(p, A3_EXPERTS[t][key[1]]))
    new_routers = [shaped(dict(p, gan=True), A3_ROUTER) for p in routers]
    return new_lora, new_experts, new_routers, s


def student_accounting(phases: list[dict]) -> dict:
    """Iterations, generator updates and samples of a student's phases, as results.json records them.

    ``samples`` counts what the iterations draw: every DMD2 iteration draws one batch (noise and
    prompts for the generator's output that trains the fake score; GAN iterations also one batch of
    real images), so it is the sum of iterations x batch. ``generator_samples`` counts the batches the
    student's own update sees (generator updates x batch).
    """
    def updates(p: dict) -> int:
        return math.ceil(p["steps"] / phase_value(p, "fake_updates_per_generator_update"))

    return {"iterations": sum(p["steps"] for p in phases),
            "generator_updates": sum(updates(p) for p in phases),
            "samples": sum(p["steps"] * phase_value(p, "batch_size") for p in phases),
            "generator_samples": sum(updates(p) * phase_value(p, "batch_size") for p in phases),
            "phases": {p["name"]: {"iterations": p["steps"], "batch_size": phase_value(p, "batch_size"),
                                   "gan": bool(phase_value(p, "gan"))} for p in phases}}
